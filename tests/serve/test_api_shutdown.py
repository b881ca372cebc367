"""Stopping a real uvicorn with streams open: they end as cancelled requests, with [DONE], and it exits."""

from __future__ import annotations

import json
import threading
import time

import httpx
import uvicorn

from hotswap.serve.api.server import DrainingServer

from .api_support import ADMIN, free_port, make_app, small_config, store, wait_ready  # noqa: F401 - fixture


def test_shutdown_ends_open_streams_cleanly_after_the_drain(store):
    app, engine = make_app(store.home, config=small_config(max_model_len=2048))
    port = free_port()
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"),
                            engine, drain_s=0.1)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        wait_ready(lambda path: httpx.get(url + path))
        body = {"model": "acme-sql@1", "prompt": "hello", "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=ADMIN, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line)
            assert next(lines).startswith("data: ")
            server.should_exit = True  # what SIGTERM does
            stopping = time.monotonic()
            rest = list(lines)
        # far fewer than 2000 tokens: the stream was ended, not waited for (nor cut without its [DONE])
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "cancelled"
        thread.join(timeout=30)
        assert not thread.is_alive() and time.monotonic() - stopping < 10
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_shutdown_while_the_base_loads_is_no_failed_start(store, caplog):
    """SIGTERM during the base's load stops the engine before it is ready: that is a shutdown, not an
    engine that failed to start (which /health would report, and the log with a traceback)."""
    import asyncio

    from hotswap.serve.api.app import _start

    app, engine = make_app(store.home)
    services = app.state.services
    loading, go, build = threading.Event(), threading.Event(), engine._build
    engine._build = lambda: (loading.set(), go.wait(30), build())[-1]
    starter = threading.Thread(target=lambda: asyncio.run(_start(engine, services)), daemon=True)
    starter.start()
    assert loading.wait(30)
    stopper = threading.Thread(target=engine.stop_sync, daemon=True)  # as the draining server does
    stopper.start()
    deadline = time.monotonic() + 30
    while not engine._stop_asked and time.monotonic() < deadline:  # the stop is asked before the load ends
        time.sleep(0.01)
    go.set()
    starter.join(30)
    stopper.join(30)
    assert engine.state == "stopped" and services.catalog.start_error is None
    assert "failed to start" not in caplog.text
