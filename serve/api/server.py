"""uvicorn whose graceful shutdown ends generation cleanly.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, waits for open responses, and after its
graceful timeout cancels their tasks: a stream cut that way ends without `data: [DONE]` (clients read a
broken connection) and logs a traceback per stream; without a timeout it waits for every stream to
finish, however long. Here running requests get `drain_s` to finish; then the engine stops, which ends
each open stream as a cancelled request (a last chunk with finish_reason "cancelled", then [DONE]) and
each whole answer with what it has, so the process exits soon after.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from ..engine import Engine

log = logging.getLogger("hotswap.serve.api")
WRITE_OFF_S = 5.0  # after the engine stops, for the ended responses to be written out


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, drain_s: float = 10.0) -> None:
        config.timeout_graceful_shutdown = drain_s + WRITE_OFF_S  # uvicorn's hard cut, a backstop only
        super().__init__(config)
        self.engine, self.drain_s = engine, drain_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stopper = asyncio.ensure_future(self._stop_engine_after_drain())
        try:
            await super().shutdown(sockets)  # its lifespan shutdown stops the engine too (waiting for this stop)
        finally:
            stopper.cancel()

    async def _stop_engine_after_drain(self) -> None:
        await asyncio.sleep(self.drain_s)
        if self.server_state.tasks:
            log.info("ending %d open request(s): the server is stopping", len(self.server_state.tasks))
        await self.engine.stop()
