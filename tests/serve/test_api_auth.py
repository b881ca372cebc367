"""API keys, roles and tenant isolation over HTTP; the no-keys loopback rule of `hotswap serve`."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from hotswap.serve.api import catalog
from hotswap.serve.cli import serve_app

from .api_support import ACME, ADMIN, BASE, GLOBEX, bearer, make_app, running_client, client, served, store  # noqa: F401


def complete(client, model: str, headers):
    return client.post("/v1/completions", headers=headers,
                       json={"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0})


@pytest.mark.parametrize("headers, why", [
    ({}, "missing API key"),
    ({"Authorization": "Basic b3BzOnB3"}, "malformed"),
    ({"Authorization": "Bearer"}, "malformed"),
    (bearer("sk-not-a-key-0000000000"), "invalid API key"),
])
def test_requests_without_a_valid_key_are_401(client, headers, why):
    for response in (complete(client, BASE, headers), client.get("/v1/models", headers=headers),
                     client.get("/v1/adapters", headers=headers)):
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and why in error["message"]
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_health_ready_and_schema_need_no_key(client):
    assert client.get("/health").status_code == 200
    assert client.get("/ready").json() == {"ready": True, "base": "tiny@1", "detail": None}
    assert client.get("/schema/openapi.json").status_code == 200


def test_user_keys_cannot_manage(client):
    for method, path in [("GET", "/v1/adapters"), ("POST", "/v1/adapters/acme-sql/load"),
                         ("POST", "/v1/adapters/acme-sql/pin"), ("GET", "/v1/hub/acme-sql"),
                         ("PUT", "/v1/hub/acme-sql/aliases/prod"), ("POST", "/v1/hub/publish"), ("GET", "/metrics")]:
        response = client.request(method, path, headers=ACME, json={"version": 1} if method == "PUT" else None)
        assert response.status_code == 403, (path, response.text)
        error = response.json()["error"]
        assert error["type"] == "permission_error" and "admin" in error["message"]
    assert client.get("/v1/adapters", headers=ADMIN).status_code == 200
    assert client.get("/metrics", headers=ADMIN).status_code == 200


def test_a_tenant_uses_only_its_adapters(client):
    assert complete(client, "acme-sql@prod", ACME).status_code == 200
    assert complete(client, BASE, ACME).status_code == 200  # the base is shared by every key
    for model in ["globex-sql", "globex-sql@1", "tiny-ft", "globex-nothing"]:
        response = complete(client, model, ACME)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["param"] == "model"
    chat = client.post("/v1/chat/completions", headers=GLOBEX,
                       json={"model": "acme-chat", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 403
    assert client.get("/v1/models/globex-sql", headers=ACME).status_code == 403
    assert complete(client, "globex-sql", GLOBEX).status_code == 200
    assert complete(client, "globex-sql", ADMIN).status_code == 200


def test_a_combination_needs_every_adapter_it_names(client):
    response = complete(client, "acme-sql@prod*0.5+acme-chat*0.5", ACME)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "acme-sql@1*0.5+acme-chat@1*0.5"  # the exact versions and weights
    response = complete(client, "acme-sql+globex-sql*0.5", ACME)
    assert response.status_code == 403 and "'globex-sql'" in response.json()["error"]["message"]
    response = complete(client, "acme-sql*half", ACME)
    assert response.status_code == 400 and "'half' of 'acme-sql' is not a number" in response.json()["error"]["message"]
    response = complete(client, "acme-sql+acme-nothing", ACME)
    assert response.status_code == 404 and "acme-nothing" in response.json()["error"]["message"]
    for model in ("acme-sql+globex-sql", "globex-sql+acme-sql"):  # a card too: 403 whichever part is foreign
        assert client.get(f"/v1/models/{model}", headers=ACME).status_code == 403, model


def test_a_tenant_lists_only_its_adapters(client):
    ids = {m["id"] for m in client.get("/v1/models", headers=ACME).json()["data"]}
    assert BASE in ids and {"acme-sql", "acme-sql@prod", "acme-chat"} <= ids
    assert not any(i.startswith(("globex", "tiny-ft")) for i in ids)
    ids = {m["id"] for m in client.get("/v1/models", headers=GLOBEX).json()["data"]}
    assert ids == {BASE, "globex-sql", "globex-sql@1"}
    ids = {m["id"] for m in client.get("/v1/models", headers=ADMIN).json()["data"]}
    assert {"acme-sql", "globex-sql", "tiny-ft"} <= ids


def test_nearest_name_hints_never_show_another_tenants_names(client):
    # "acme-chat" is the closest existing name, but globex may not see it
    response = complete(client, "globex-chat", GLOBEX)
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert "acme" not in message and "globex-sql" in message
    assert "acme-chat" in complete(client, "globex-chat", ADMIN).json()["error"]["message"]


def test_a_name_published_while_its_request_fails_never_hints_at_other_tenants(store, tmp_path, monkeypatch):
    """The engine finds no `globex-chat` (the registry's hints then span every tenant), and it is
    published before the catalog reads the names: its hint-free path must not pass that message on."""
    home = shutil.copytree(store.home, tmp_path / "home", symlinks=True)
    real = catalog._entry_names

    def names_after_a_publish(reg):
        reg.publish(store.adapters["acme-chat@1"], name="globex-chat", base=BASE)  # an admin, meanwhile
        return real(reg)
    monkeypatch.setattr(catalog, "_entry_names", names_after_a_publish)
    app, _engine = make_app(home)
    with running_client(app) as client:
        response = complete(client, "globex-chat", GLOBEX)
    assert "acme" not in response.text
    assert response.status_code == 200 and response.json()["model"] == "globex-chat@1"


def test_without_keys_every_local_caller_is_admin(store):
    app, _ = make_app(store.home, keys=[])
    with running_client(app) as client:
        assert client.get("/v1/adapters").status_code == 200
        assert complete(client, "globex-sql", {}).status_code == 200
        assert client.get("/metrics").status_code == 200


def test_metrics_can_be_public(store):
    app, _ = make_app(store.home, public_metrics=True)
    with running_client(app) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/adapters").status_code == 401


def test_serve_refuses_to_bind_beyond_loopback_without_keys(store, monkeypatch):
    monkeypatch.delenv("HOTSWAP_API_KEYS", raising=False)
    monkeypatch.delenv("HOTSWAP_ADMIN_KEY", raising=False)
    result = CliRunner().invoke(serve_app, ["--base", BASE, "--home", str(store.home), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in result.output


def test_serve_reports_a_bad_key_file(store, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "x", "key": "short", "role": "root"}]}))
    result = CliRunner().invoke(serve_app, ["--base", BASE, "--home", str(store.home), "--api-keys", str(keys)])
    assert result.exit_code == 2
    assert "keys.json" in result.output and "keys.0.key" in result.output and "keys.0.role" in result.output


def test_serve_reports_an_unknown_base(store):
    result = CliRunner().invoke(serve_app, ["--base", "tiyn", "--home", str(store.home)])
    assert result.exit_code == 2 and "tiny" in result.output


@pytest.mark.parametrize("flags, message", [
    (["--device", "nonsense"], "error: --device 'nonsense': not a device"),
    (["--max-model-len", "-3"], "max_model_len must be positive, got -3"),
    (["--max-model-len", "0"], "max_model_len must be positive, got 0"),
    (["--max-tokens-limit", "0"], "max_tokens_limit must be positive, got 0"),
    (["--model-memory-mib", "-1"], "model_memory_bytes must be at least 0"),
    (["--max-running", "0"], "max_running must be positive, got 0"),
    (["--log-level", "loud"], "--log-level 'loud' is not one of critical, error"),
])
def test_serve_refuses_unusable_flags_before_loading_anything(store, flags, message):
    result = CliRunner().invoke(serve_app, ["--base", BASE, "--home", str(store.home), *flags])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize("key", ["  sk-padded-0123456789  ", "sk-accent-0123456789é"])
def test_a_key_no_header_can_carry_is_refused_at_start(store, tmp_path, key):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "x", "key": key, "role": "user", "adapters": ["*"]}]}))
    result = CliRunner().invoke(serve_app, ["--base", BASE, "--home", str(store.home), "--api-keys", str(keys)])
    assert result.exit_code == 2 and "keys.0.key" in result.output


def test_serve_refuses_an_unknown_lora_dtype(store):
    result = CliRunner().invoke(serve_app, ["--base", BASE, "--home", str(store.home), "--lora-dtype", "int8"])
    assert result.exit_code == 2 and "unknown lora_dtype 'int8'" in result.output


def test_serve_builds_the_engine_and_app_from_its_flags(store, tmp_path, monkeypatch):
    """The command's whole path up to the server's run, which is replaced by a recorder (no server starts)."""
    from hotswap.serve.api.server import DrainingServer

    calls = []
    monkeypatch.setattr(DrainingServer, "run", lambda self: calls.append(
        (self.config.app, {"host": self.config.host, "port": self.config.port, "drain_s": self.drain_s})))
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "ops"\nkey = "sk-ops-0123456789abcdef"\nrole = "admin"\n')
    result = CliRunner().invoke(serve_app, [
        "--base", BASE, "--home", str(store.home), "--host", "0.0.0.0", "--port", "8123", "--api-keys", str(keys),
        "--max-running", "3", "--max-queue", "7", "--kv-cache-mib", "16", "--lora-capacity-mib", "8",
        "--host-cache-mib", "32", "--max-model-len", "128", "--device", "cpu", "--public-metrics",
        "--lora-dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "auth: 1 API keys (admin: ops; user: none)" in result.output
    [(app, kwargs)] = calls
    assert kwargs == {"host": "0.0.0.0", "port": 8123, "drain_s": 10.0}
    services = app.state.services
    config = services.engine.config
    assert (config.max_running, config.max_queue, config.max_model_len, config.device) == (3, 7, 128, "cpu")
    assert (config.kv_cache_bytes, config.lora_capacity_bytes, config.host_cache_bytes) == (16 << 20, 8 << 20, 32 << 20)
    assert services.settings.public_metrics and [k.name for k in services.settings.keys] == ["ops"]
    assert config.lora_dtype == "bfloat16"


def test_serve_log_level_reaches_the_servers_own_lines(store, monkeypatch):
    """--log-level quiets (or opens) hotswap's loggers as well as uvicorn's: `warning` hides the INFO lines."""
    import logging

    from hotswap.serve.api.server import DrainingServer

    monkeypatch.setattr(DrainingServer, "run", lambda self: None)  # no server starts
    ours = logging.getLogger("hotswap")
    before = ours.level
    try:
        for flag, level in (("warning", logging.WARNING), ("DEBUG", logging.DEBUG)):
            result = CliRunner().invoke(serve_app, ["--base", BASE, "--home", str(store.home), "--device", "cpu",
                                                    "--log-level", flag])
            assert result.exit_code == 0, result.output
            assert ours.getEffectiveLevel() == level
            assert logging.getLogger("hotswap.serve.api").isEnabledFor(logging.INFO) == (level <= logging.INFO)
    finally:
        ours.setLevel(before)
