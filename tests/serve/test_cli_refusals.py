"""`hotswap serve`, `hotswap bench` and the demo refuse what cannot work before loading anything:
one line naming the flag, a non-zero status, never a traceback or a server that can only say 503."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from transformers import LlamaConfig
from typer.testing import CliRunner

from hotswap.serve.api import demo
from hotswap.serve.bench import _word_tokenizer, token_limit
from hotswap.serve.cli import bench_app, serve_app

from . import api_support
from .api_support import BASE, free_port

store = api_support.store  # the fixture, for this module's tests
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")


def _serve(store, *flags):
    return CliRunner().invoke(serve_app, ["--base", BASE, "--home", str(store.home), *flags])


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "error: --port: Input should be less than or equal to 65535"),
    (["--default-max-tokens", "0"], "error: --default-max-tokens: Input should be greater than or equal to 1"),
    (["--device", "meta"], "error: --device 'meta': the engine runs on cpu or cuda"),
    pytest.param(["--device", "cuda"], "sees no CUDA device", marks=no_cuda),
])
def test_serve_refuses_a_bad_flag_on_one_line(store, flags, message):
    result = _serve(store, *flags)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "pydantic" not in result.output and len(result.output.strip().splitlines()) == 1


def test_serve_refuses_a_port_in_use_before_loading_the_base(store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve(store, "--port", str(port))
    assert result.exit_code == 2, result.output
    assert f"error: cannot listen on 127.0.0.1:{port}:" in result.output and "in use" in result.output


@pytest.mark.parametrize("flags, message", [
    (["--shape", "tiny", "--device", "meta"], "the engine runs on cpu or cuda"),
    (["--shape", "tiny", "--device", "tpu"], "not a device"),
    pytest.param(["--shape", "tiny", "--device", "cuda"], "sees no CUDA device", marks=no_cuda),
    (["--base", "acme-sql"], "acme-sql@2 is an adapter, not a base"),
])
def test_bench_refuses_a_device_or_base_it_cannot_run(store, flags, message):
    result = CliRunner().invoke(bench_app, ["--home", str(store.home), *flags])
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_bench_draws_prompt_ids_the_tokenizer_knows(tmp_path):
    """A vocabulary padded past its tokenizer (128 embedding rows, 100 tokens): the engine refuses
    ids from 100 on, so the bench must not send them."""
    _word_tokenizer(100, 1).save_pretrained(tmp_path)
    assert token_limit(tmp_path, LlamaConfig(vocab_size=128)) == 100
    assert token_limit(tmp_path, LlamaConfig(vocab_size=64)) == 64


def _demo(store, *flags):
    return demo.main(["--base", BASE, "--home", str(store.home), "--adapters-dir", "no-such-dir", "--no-serve", *flags])


@pytest.mark.parametrize("flags, message", [
    (["--base", "acme-sql", "--port", "0"], "acme-sql@2 is an adapter, not a base"),
    (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without API keys"),
    (["--port", "99999"], "demo: --port: Input should be less than or equal to 65535"),
    (["--markdown", "."], "--markdown .: not a file in an existing folder"),
])
def test_demo_refuses_before_loading_the_base(store, capsys, flags, message):
    assert _demo(store, *flags) == 2
    assert message in capsys.readouterr().err


def test_demo_stops_waiting_when_the_engine_fails_to_start(store, monkeypatch):
    from hotswap.serve.engine import Engine

    def fail(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(Engine, "start_sync", fail)
    began = time.monotonic()
    with pytest.raises(SystemExit, match="failed to start: RuntimeError: boom"):
        _demo(store, "--port", str(free_port()))
    assert time.monotonic() - began < 60  # not the ten-minute readiness deadline
