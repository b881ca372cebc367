"""The HTTP layer's own connection to the registry, used from one worker thread.

The engine keeps its `Registry` (and SQLite connection) for itself; the API opens a second one on the
same folder, so a publish or an alias move here is a transaction of its own and never runs on the
event loop. One thread keeps this connection's calls in order.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

from hotswap.hub import Registry

T = TypeVar("T")


class HubAccess:
    def __init__(self, home: Path) -> None:
        self.home = home
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotswap-api-hub")
        self._registry: Registry | None = None

    def _open(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.home)
        return self._registry

    async def run(self, fn: Callable[[Registry], T]) -> T:
        """Run `fn(registry)` on the worker thread and wait for it without blocking the loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._open()))

    def close(self) -> None:
        def shut() -> None:
            if self._registry is not None:
                self._registry.close()
                self._registry = None
        self._executor.submit(shut).result()
        self._executor.shutdown(wait=True)
