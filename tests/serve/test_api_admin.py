"""Management over HTTP on the real engine and registry: residency, load/unload/pin/unpin, publish, aliases."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from .api_support import ADMIN, BASE, save_adapter, client, served, store  # noqa: F401


def adapters(client, **params) -> dict[str, dict]:
    response = client.get("/v1/adapters", headers=ADMIN, params=params)
    assert response.status_code == 200, response.text
    return {a["ref"]: a for a in response.json()["data"]}


def act(client, ref: str, action: str, status: int = 200) -> dict:
    response = client.post(f"/v1/adapters/{ref}/{action}", headers=ADMIN)
    assert response.status_code == status, response.text
    return response.json()


def complete(client, model: str) -> dict:
    response = client.post("/v1/completions", headers=ADMIN,
                           json={"model": model, "prompt": "hello world", "max_tokens": 6, "temperature": 0,
                                 "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()


def upload(client, folder: Path, name: str, **form) -> object:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
    return client.post("/v1/hub/publish", headers=ADMIN, data={"name": name, **form}, files=files)


def test_adapter_list_shows_metadata_and_disk_residency(client):
    listed = adapters(client)
    sql = listed["acme-sql@1"]
    assert sql | {"name": "acme-sql", "version": 1, "kind": "adapter", "aliases": ["prod"], "base": "tiny@1",
                  "servable": True, "rank": 4, "target_modules": ["q_proj", "v_proj"], "task": "demo"} == sql
    assert listed["acme-sql@2"]["aliases"] == ["latest"]
    assert listed["other-fit@1"]["servable"] is False and listed["tiny-ft@1"]["kind"] == "model"
    assert listed["globex-sql@1"]["residency"] == {"tier": "disk", "pinned": False, "pins": 0, "device_bytes": 0,
                                                    "last_used": None}
    assert set(adapters(client, kind="model")) == {"tiny-ft@1"}
    assert "tiny@1" not in listed  # the base is not an adapter


def test_load_unload_pin_unpin(client):
    loaded = act(client, "globex-sql", "load")
    assert loaded["ref"] == "globex-sql@1" and loaded["residency"]["tier"] == "device"
    assert loaded["residency"]["device_bytes"] > 0
    assert "globex-sql@1" in adapters(client, tier="device")

    unloaded = act(client, "globex-sql@1", "unload")
    assert unloaded == {"ref": "globex-sql@1", "unloaded": True, "residency": unloaded["residency"]}
    assert unloaded["residency"]["tier"] == "disk"
    assert act(client, "globex-sql@1", "unload")["unloaded"] is False  # nothing left to drop

    pinned = act(client, "globex-sql", "pin")
    assert pinned["residency"]["tier"] == "device" and pinned["residency"]["pinned"] is True
    busy = act(client, "globex-sql", "unload", status=409)
    assert busy["error"]["code"] == "adapter_busy" and "pinned: true" in busy["error"]["message"]
    assert "running requests: 0" in busy["error"]["message"]  # the manual pin is no running request
    unpinned = act(client, "globex-sql", "unpin")
    assert unpinned["residency"]["pinned"] is False and unpinned["residency"]["tier"] == "device"
    assert act(client, "globex-sql", "unload")["unloaded"] is True


def test_serving_an_adapter_makes_it_resident(client):
    complete(client, "acme-chat")
    held = adapters(client)["acme-chat@1"]["residency"]
    assert held["tier"] in ("device", "host") and held["last_used"] is not None


def test_full_model_load_and_unload(client):
    assert act(client, "tiny-ft", "load")["residency"]["tier"] == "device"
    assert act(client, "tiny-ft", "unload")["unloaded"] is True


def test_management_refusals(client):
    assert act(client, BASE, "load", status=400)["error"]["param"] == "ref"
    assert act(client, "other-fit", "load", status=400)["error"]["code"] == "incompatible_adapter"
    assert act(client, "globex-sqk", "pin", status=404)["error"]["code"] == "model_not_found"
    combination = "acme-sql*0.5+acme-chat"  # built on demand by requests: not managed here
    for action in ("load", "pin", "unpin", "unload"):
        error = act(client, combination, action, status=400)["error"]
        assert error["param"] == "ref" and "is a combination of adapters" in error["message"]
    assert "*0.5" not in client.get("/metrics", headers=ADMIN).text  # nothing was loaded or pinned on the way


def test_publish_upload_then_serve(client, store, tmp_path):
    folder = save_adapter(store.base_dir, tmp_path / "up", seed=21)
    response = upload(client, folder, "acme-up", task="text-to-sql", language="en", aliases="prod, canary",
                      tags=json.dumps({"team": "a"}), metrics=json.dumps({"exact_match": 0.5}))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body | {"ref": "acme-up@1", "name": "acme-up", "version": 1, "created": True, "base": "tiny@1",
                   "rank": 4, "target_modules": ["q_proj", "v_proj"]} == body
    assert body["aliases"] == ["canary", "latest", "prod"]
    assert complete(client, "acme-up@prod")["model"] == "acme-up@1"
    assert "acme-up" in {m["id"] for m in client.get("/v1/models", headers=ADMIN).json()["data"]}

    again = upload(client, folder, "acme-up")
    assert again.status_code == 201 and again.json()["created"] is False and again.json()["version"] == 1


@pytest.mark.parametrize("case, status, code, param", [
    ("bad-file-name", 400, "bad_upload", "files"),
    ("missing-weights", 400, "unsafe_content", None),
    ("other-base", 400, "incompatible_adapter", None),
    ("bad-tags", 400, "bad_upload", "tags"),
    ("bad-metrics", 400, "bad_upload", "metrics"),
    ("bad-name", 400, "invalid_name", "name"),
    ("numeric-alias", 400, "invalid_name", "aliases"),
    ("nan-metric", 400, "bad_upload", "metrics"),
    ("unknown-base", 404, "not_found", "base"),
    ("latest-alias", 400, "bad_upload", "aliases"),  # publish moves latest itself
    ("long-task", 400, "bad_upload", "task"),
    ("bad-language", 400, "invalid_metadata", "language"),
])
def test_publish_refusals_store_nothing(client, store, tmp_path, case, status, code, param):
    folder = save_adapter(store.base_dir, tmp_path / "a", seed=22)
    name, form = "acme-refused", {}
    if case == "bad-file-name":
        files = [("files", ("../adapter_config.json", b"{}"))]
        response = client.post("/v1/hub/publish", headers=ADMIN, data={"name": name}, files=files)
    else:
        if case == "missing-weights":
            (folder / "adapter_model.safetensors").unlink()
        if case == "other-base":
            folder = store.adapters["other-fit@1"]
        if case == "bad-tags":
            form = {"tags": "{not json"}
        if case == "bad-metrics":
            form = {"metrics": json.dumps({"exact_match": "high"})}
        if case == "bad-name":
            name = "Bad Name"
        if case == "numeric-alias":
            form = {"aliases": "prod, 7"}
        if case == "unknown-base":
            form = {"base": "nobase"}
        if case == "nan-metric":
            form = {"metrics": '{"exact_match": NaN}'}
        if case == "latest-alias":
            form = {"aliases": "prod, latest"}
        if case == "long-task":
            form = {"task": "x" * 201}
        if case == "bad-language":
            form = {"language": "english please"}
        response = upload(client, folder, name, **form)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and (param is None or error["param"] == param)
    assert client.get("/v1/hub/acme-refused", headers=ADMIN).status_code == 404


def test_alias_moves_reach_the_next_request(client, store, tmp_path):
    for seed in (31, 32):
        assert upload(client, save_adapter(store.base_dir, tmp_path / f"v{seed}", seed=seed), "acme-moving").status_code == 201
    entry = client.get("/v1/hub/acme-moving", headers=ADMIN).json()
    assert entry["versions"] == [1, 2] and entry["aliases"] == {"latest": 2} and entry["kind"] == "adapter"

    moved = client.put("/v1/hub/acme-moving/aliases/prod", headers=ADMIN, json={"version": 1})
    assert moved.status_code == 200 and moved.json() == {"name": "acme-moving", "alias": "prod", "version": 1,
                                                         "previous": None, "at": None}
    first = complete(client, "acme-moving@prod")
    assert first["model"] == "acme-moving@1"
    moved = client.put("/v1/hub/acme-moving/aliases/prod", headers=ADMIN, json={"version": 2})
    assert moved.json()["previous"] == 1
    second = complete(client, "acme-moving@prod")
    assert second["model"] == "acme-moving@2"
    assert second["choices"][0]["text"] != first["choices"][0]["text"]

    history = client.get("/v1/hub/acme-moving", headers=ADMIN).json()["history"]
    assert [(h["alias"], h["previous"], h["version"]) for h in history if h["alias"] == "prod"] == [
        ("prod", None, 1), ("prod", 1, 2)]
    assert all(h["at"] for h in history)  # when each move was made, as `hotswap hub aliases` shows
    removed = client.delete("/v1/hub/acme-moving/aliases/prod", headers=ADMIN)
    assert removed.status_code == 200 and removed.json()["version"] is None
    gone = client.post("/v1/completions", headers=ADMIN, json={"model": "acme-moving@prod", "prompt": "x"})
    assert gone.status_code == 404

    assert client.delete("/v1/hub/acme-moving/aliases/latest", headers=ADMIN).status_code == 400
    assert client.put("/v1/hub/acme-moving/aliases/prod", headers=ADMIN, json={"version": 9}).status_code == 404
    assert client.put("/v1/hub/acme-moving/aliases/prod", headers=ADMIN, json={"version": 0}).status_code == 400
    assert client.put("/v1/hub/acme-moving/aliases/Bad!", headers=ADMIN, json={"version": 1}).status_code == 400
    numeric = client.put("/v1/hub/acme-moving/aliases/7", headers=ADMIN, json={"version": 1})  # reads as version 7
    assert numeric.status_code == 400 and "is a number" in numeric.json()["error"]["message"]


def test_unpin_of_what_is_not_pinned_changes_nothing(client):
    for ref in ("tiny-ft", "acme-chat", "globex-sql@1"):
        assert act(client, ref, "unpin")["residency"]["pinned"] is False
    assert complete(client, BASE)["choices"]  # the engine still serves


def test_alias_versions_out_of_range_are_400(client):
    for version in (0, 2**31, 10**30):
        response = client.put("/v1/hub/acme-sql/aliases/prod", headers=ADMIN, json={"version": version})
        assert response.status_code == 400 and response.json()["error"]["param"] == "version"


def test_one_adapter_is_described_even_when_this_base_cannot_serve_it(client):
    info = client.get("/v1/adapters/other-fit", headers=ADMIN)
    assert info.status_code == 200 and info.json()["servable"] is False and info.json()["base"] == "other@1"
    assert client.get("/v1/adapters/acme-sql@prod", headers=ADMIN).json()["ref"] == "acme-sql@1"
    assert client.get("/v1/adapters/tiny", headers=ADMIN).status_code == 400
    missing = client.get("/v1/adapters/acme-sqll", headers=ADMIN)
    assert missing.status_code == 404 and "acme-sql" in missing.json()["error"]["message"]


def test_each_management_change_is_logged_with_the_keys_name(client, store, tmp_path, caplog):
    """An operator can tell from the log who changed what: one line per change, naming the key ("ops")."""
    with caplog.at_level(logging.INFO, logger="hotswap.serve.api"):
        act(client, "globex-sql", "pin")
        act(client, "globex-sql", "unpin")
        act(client, "globex-sql", "unload")
        act(client, "globex-sql", "unload")  # nothing left to drop: no change, no line
        folder = save_adapter(store.base_dir, tmp_path / "logged", seed=41)
        assert upload(client, folder, "acme-logged").status_code == 201
        assert client.put("/v1/hub/acme-logged/aliases/prod", headers=ADMIN, json={"version": 1}).status_code == 200
        assert client.delete("/v1/hub/acme-logged/aliases/prod", headers=ADMIN).status_code == 200
        act(client, "acme-logged", "unpin")  # not pinned: no change
    lines = [r.getMessage() for r in caplog.records if r.name == "hotswap.serve.api"]
    assert lines == ["key 'ops' pinned globex-sql@1", "key 'ops' unpinned globex-sql@1",
                     "key 'ops' unloaded globex-sql@1", "key 'ops' published acme-logged@1",
                     "key 'ops' pointed acme-logged@prod at version 1",
                     "key 'ops' removed acme-logged@prod (it named version 1)"]
