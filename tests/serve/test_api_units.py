"""Pure helpers of the HTTP layer: key files, loopback rule, key patterns, the error table, the exposition."""

from __future__ import annotations

import hashlib
import json

import pytest

from hotswap.hub import InUseError, InvalidName, NotFoundError
from hotswap.serve.api.auth import KeyRing, Principal
from hotswap.serve.api.errors import ERRORS, describe
from hotswap.serve.api.exceptions import Forbidden, Unauthenticated, UnknownModel
from hotswap.serve.api.metrics import ApiMetrics, render
from hotswap.serve.api.settings import ApiKeySpec, KeySettingsError, ServerSettings, is_loopback, load_keys
from hotswap.serve.engine import (
    AdapterNotFound, CapacityExceeded, EngineNotReady, EngineStats, IncompatibleAdapter, InvalidRequest,
    PinnedOut, PromptTooLong, QueueFull)

SECRET = "sk-test-0123456789abcdef"


def test_key_file_json_toml_and_environment(tmp_path):
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [
        {"name": "ops", "key": SECRET, "role": "admin"},
        {"name": "acme", "key_sha256": hashlib.sha256(b"sk-acme-0123456789abcdef").hexdigest(),
         "adapters": ["acme-*"]}]}))
    (tmp_path / "keys.toml").write_text('[[keys]]\nname = "t"\nkey = "sk-toml-0123456789abcdef"\nadapters = ["t-*"]\n')
    keys = load_keys(tmp_path / "keys.json", environ={})
    assert [(k.name, k.role, k.adapters) for k in keys] == [("ops", "admin", ["*"]), ("acme", "user", ["acme-*"])]
    assert [k.name for k in load_keys(tmp_path / "keys.toml", environ={})] == ["t"]
    env = {"HOTSWAP_API_KEYS": json.dumps({"keys": [{"name": "e", "key": "sk-env-0123456789abcdef"}]}),
           "HOTSWAP_ADMIN_KEY": "sk-adm-0123456789abcdef"}
    assert [(k.name, k.role) for k in load_keys(None, environ=env)] == [("e", "user"), ("admin", "admin")]

    ring = KeyRing(keys)
    assert ring.authenticate("Bearer sk-acme-0123456789abcdef").name == "acme"
    assert ring.authenticate(f"bearer {SECRET}").is_admin
    with pytest.raises(Unauthenticated, match="invalid"):
        ring.authenticate("Bearer sk-acme-0123456789abcdeX")
    assert KeyRing([]).authenticate(None).is_admin  # auth off


@pytest.mark.parametrize("document, where", [
    ("{", "not valid JSON"),
    (json.dumps({"keys": [{"name": "x", "key": "short"}]}), "keys.0.key"),
    (json.dumps({"keys": [{"name": "x", "key": SECRET, "key_sha256": "0" * 64}]}), "exactly one of key"),
    (json.dumps({"keys": [{"name": "x", "key": SECRET, "role": "root"}]}), "keys.0.role"),
    (json.dumps({"keys": [{"name": "x", "key": SECRET, "extra": 1}]}), "keys.0.extra"),
    (json.dumps({"users": []}), "users"),
])
def test_bad_key_files_say_where(tmp_path, document, where):
    path = tmp_path / "keys.json"
    path.write_text(document)
    with pytest.raises(KeySettingsError, match="keys.json") as err:
        load_keys(path, environ={})
    assert where in str(err.value)
    with pytest.raises(KeySettingsError, match="cannot read"):
        load_keys(tmp_path / "absent.json", environ={})


def test_a_key_file_that_is_not_text_says_where(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_bytes(b"\xff\xfe[[keys]]\n")
    with pytest.raises(KeySettingsError, match="keys.toml is not UTF-8 text"):
        load_keys(path, environ={})


def test_duplicate_secrets_are_refused():
    with pytest.raises(ValueError, match="same secret"):
        ServerSettings(keys=[ApiKeySpec(name="a", key=SECRET), ApiKeySpec(name="b", key=SECRET)])


def test_loopback_rule():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.org"]))
    ServerSettings(host="127.0.0.1").check_binding()
    ServerSettings(host="0.0.0.0", keys=[ApiKeySpec(name="a", key=SECRET)]).check_binding()
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without API keys"):
        ServerSettings(host="0.0.0.0").check_binding()


def test_key_patterns_and_nearest_names():
    acme = Principal("acme", "user", ApiKeySpec(name="acme", key=SECRET, adapters=["acme-*", "shared"]))
    assert acme.may_use("acme-sql") and acme.may_use("shared") and not acme.may_use("globex-sql")
    assert not acme.may_use("shared-2")
    names = ["acme-sql", "acme-chat", "globex-chat"]
    assert acme.nearest("globex-chat", names) == ["acme-chat"]  # never globex's own name
    assert Principal("ops", "admin", ApiKeySpec(name="ops", key=SECRET, role="admin")).may_use("anything")


@pytest.mark.parametrize("exc, status, code", [
    (Unauthenticated("x"), 401, "invalid_api_key"),
    (Forbidden("x"), 403, "forbidden"),
    (UnknownModel("x", ["a"]), 404, "model_not_found"),
    (PromptTooLong("x"), 400, "context_length_exceeded"),
    (InvalidRequest("x"), 400, "invalid_value"),
    (QueueFull("x"), 429, "queue_full"),
    (EngineNotReady("x"), 503, "not_ready"),
    (AdapterNotFound("x"), 404, "model_not_found"),
    (IncompatibleAdapter("x"), 400, "incompatible_adapter"),
    (CapacityExceeded("x"), 400, "capacity_exceeded"),
    (PinnedOut("x"), 409, "pinned_out"),
    (NotFoundError("x"), 404, "not_found"),
    (InvalidName("x"), 400, "invalid_name"),
    (InUseError("x"), 409, "in_use"),
    (RuntimeError("boom"), 500, "internal_error"),
])
def test_error_table(exc, status, code):
    got, detail, _retry = describe(exc, "/v1/chat/completions")
    assert (got, detail.code) == (status, code)
    if status == 500:
        assert "boom" not in detail.message  # internals stay in the log
    assert UnknownModel("no model 'x'", ["acme-sql"]).args[0] == "no model 'x' (nearest: acme-sql)"
    assert all(issubclass(cls, BaseException) for cls in ERRORS)


def test_prompt_too_long_names_the_field_of_the_endpoint():
    assert describe(PromptTooLong("x"), "/v1/chat/completions")[1].param == "messages"
    assert describe(PromptTooLong("x"), "/v1/completions")[1].param == "prompt"
    assert describe(PromptTooLong("x"), "/v1/classify")[1].param == "input"


def test_exposition_of_histograms_is_cumulative_and_labels_are_escaped():
    metrics = ApiMetrics()
    metrics.finished('we"ird\\name', "completions", "length", 5, 3, ttft=0.02, duration=0.05)
    stats = EngineStats()
    stats.adapter_load.observe(0.3)
    stats.adapter_hits.update({"device": 4, "host": 2, "disk": 1})
    text = render(metrics, stats, [], ready=True)
    assert 'hotswap_requests_total{model="we\\"ird\\\\name",endpoint="completions",finish_reason="length"} 1' in text
    assert 'hotswap_adapter_cache_hits_total{tier="device"} 4' in text
    assert 'hotswap_adapter_cache_misses_total{tier="device"} 3' in text
    assert 'hotswap_adapter_cache_misses_total{tier="host"} 1' in text
    assert 'hotswap_adapter_load_seconds_bucket{le="0.25"} 0' in text
    assert 'hotswap_adapter_load_seconds_bucket{le="0.5"} 1' in text
    assert 'hotswap_adapter_load_seconds_bucket{le="+Inf"} 1' in text
    assert 'hotswap_time_per_output_token_seconds_sum{model="we\\"ird\\\\name"} 0.015' in text


def test_an_error_after_the_first_chunk_becomes_an_error_event_then_done():
    """Once a stream has begun, a failure is reported in-band (the openai client raises it)."""
    import asyncio
    import json as _json

    from hotswap.serve.api.generation import Choice
    from hotswap.serve.api.responses import ChunkWriter, chunk_stream
    from hotswap.serve.engine import Target, TokenEvent, Usage

    class Run:  # the parts of generation.Run a ChunkWriter reads
        target, created, id_suffix, cancelled = Target("adapter", "sql@3", "d" * 8), 1, "req-1", 0

        def usage(self):
            return Usage(3, 1)

        def cancel(self):
            self.cancelled += 1

    run = Run()
    choice = Choice(0, stream=None)  # type: ignore[arg-type]

    async def events():
        yield choice, TokenEvent("req-1", (5,), "SEL")
        raise CapacityExceeded("sql@3 needs 9 MiB of device rows but the capacity is 4 MiB")

    errors = []

    async def collect():
        stream = events()
        first = await anext(stream)
        return [c async for c in chunk_stream(ChunkWriter(run, chat=True, include_usage=False), first, stream,
                                              "/v1/chat/completions", errors.append)]

    chunks = asyncio.run(collect())
    payloads = [c.decode().removeprefix("data: ").strip() for c in chunks]
    assert _json.loads(payloads[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert _json.loads(payloads[1])["choices"][0]["delta"] == {"content": "SEL"}
    assert _json.loads(payloads[2])["error"]["code"] == "capacity_exceeded"
    assert payloads[3] == "[DONE]" and len(payloads) == 4
    assert [type(e) for e in errors] == [CapacityExceeded] and run.cancelled == 1


def test_the_banner_writes_an_ipv6_host_as_a_url_can_hold_it():
    from hotswap.serve.api.command import http_url

    assert http_url("::1", 8000) == "http://[::1]:8000"
    assert http_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert http_url("localhost", 80) == "http://localhost:80"
