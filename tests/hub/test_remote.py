"""Rule 10: Hugging Face Hub interop (`hotswap hub push` / `pull`), against a Hub-compatible HTTP
endpoint the test serves itself on 127.0.0.1 (`fake_hub_server.FakeHub`), reached through
`HF_ENDPOINT` and `HF_TOKEN` exactly as huggingface_hub reads them, with a temporary `HF_HOME`.

Covered: the client side of the protocol huggingface_hub speaks for upload (create repo, preupload,
one NDJSON commit with base64 content, deleting stale files), tagging and download (model info,
refs, tree, resolve with ETag/X-Repo-Commit); the model card's content (front matter and body);
round-trip identity of the version digest through push and pull, by tag, branch and commit;
re-pushing an identical version; every publish check on pull (pickle refused, adapter/base
compatibility, base matched from the card); the mapping of huggingface_hub's errors (unknown repo,
unknown revision, missing token, offline mode, unreachable endpoint) to HubError subclasses; the
`hotswap hub push/pull` commands, in-process and as a subprocess configured only by environment.

Not covered: LFS and xet transfers of large files (the fake answers "regular" for every file, so
everything travels base64 in the commit), token scopes and gated or organisation permissions, and
the real Hub's server-side behaviour (card validation rules, rate limits, pagination, redirects to a
CDN). Those are huggingface_hub's own protocol, which this suite does not re-test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants, hf_hub_download, snapshot_download

from hotswap.hub import (IncompatibleAdapter, InvalidMetadata, InvalidName, NotFoundError, Registry,
                         RemoteError, UnsafeContent)
from hotswap.hub.cli import main
from hotswap.hub import remote
from hotswap.hub.remote import fetch_repo, pull_version, push_version

from .conftest import TINY_SOURCE, save_tiny_base
from .fake_hub_server import FakeHub

TOKEN = "hf_hotswap_test_token"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh fake Hub; huggingface_hub pointed at it, with its own HF_HOME and no stored token."""
    hf_home = tmp_path / "hf-home"
    with FakeHub(token=TOKEN) as server:
        for key, value in {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HOME": str(hf_home),
                           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        # huggingface_hub read these at import; the test process must not touch the user's cache or token
        monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


@pytest.fixture
def other_registry(tmp_path, tiny_base_dir) -> Registry:
    """A second registry (another machine) holding the same tiny base."""
    reg = Registry(tmp_path / "home2")
    reg.publish(tiny_base_dir, name="tiny", kind="base", source=TINY_SOURCE)
    return reg


def _card(files: dict[str, bytes]) -> tuple[dict, str]:
    text = files["README.md"].decode()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _upload_folder(hub: FakeHub, repo_id: str, folder: Path) -> str:
    """Put a folder in a fake repo directly (as someone else's upload would); return the commit."""
    repo = hub.create_repo(repo_id)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return repo.commit("main", {**repo.resolve("main").files, **files}, "upload").oid


def test_push_then_pull_round_trips_the_digest(hub, registry, other_registry, make_adapter):
    published = registry.publish(make_adapter(seed=1), name="sql", task="text-to-sql", language="en",
                                 tags={"team": "data"}, metrics={"exact_match": 0.75}, lineage={"recipe": "r1"})
    pushed = push_version(registry, "sql", "org/sql")
    assert (pushed["ref"], pushed["repo_id"], pushed["tag"], pushed["created"]) == ("sql@1", "org/sql", "v1", True)
    refs = hub.repos["org/sql"]
    assert refs.tags == {"v1": pushed["commit"]} and refs.branches["main"] == pushed["commit"]
    remote = hub.files_at("org/sql", "v1")
    local = {p: (registry.open("sql").path / p).read_bytes() for p, _, _ in registry.files("sql")}
    assert "README.md" in local  # PEFT writes its own card: it travels aside, as .hotswap/README.md
    assert set(remote) == set(local) | {".hotswap/README.md", ".gitattributes"}  # README.md: now the card
    assert remote[".hotswap/README.md"] == local["README.md"]
    assert {p: remote[p] for p in local if p != "README.md"} == {p: b for p, b in local.items() if p != "README.md"}

    pulled = pull_version(other_registry, "org/sql@v1", "sql")
    assert not Path(constants.HF_HUB_CACHE).exists()  # downloaded beside the registry, not into the HF cache
    assert not list(other_registry.home.glob(".pull-*"))  # and the download folder is gone
    version = pulled.version
    assert pulled.created and version.ref == "sql@1"
    assert version.digest == published.version.digest  # byte-identical files, same names
    assert other_registry.files(version) == registry.files(published.version)
    meta = version.metadata
    assert (meta.base, meta.base_fingerprint) == ("tiny@1", other_registry.resolve("tiny").metadata.fingerprint)
    assert (meta.task, meta.language, meta.tags, meta.metrics) == ("text-to-sql", "en", {"team": "data"},
                                                                   {"exact_match": 0.75})
    assert meta.lineage == {"recipe": "r1", "pulled_from": "org/sql", "revision": "v1", "commit": pushed["commit"]}
    # pulling the same content into the registry it came from is recognised as identical
    again = pull_version(registry, "org/sql", "sql")
    assert not again.created and again.version.ref == "sql@1"


def test_model_card_fields(hub, registry, make_adapter, tiny_base_dir, tmp_path):
    version = registry.publish(make_adapter(seed=2), name="sql", task="text-to-sql", language="en",
                               metrics={"exact_match": 0.5, "loss": 1.25}, lineage={"dataset": "org/sql-pairs"}).version
    push_version(registry, "sql@1", "org/sql-card", private=True)
    assert hub.repos["org/sql-card"].private
    front, body = _card(hub.files_at("org/sql-card"))
    assert front["base_model"] == TINY_SOURCE and front["library_name"] == "peft"
    assert front["language"] == ["en"] and front["pipeline_tag"] == "text-generation"
    assert {"hotswap", "adapter", "lora", "text-to-sql"} <= set(front["tags"])
    results = front["model-index"][0]["results"]
    assert {(m["type"], m["value"]) for r in results for m in r["metrics"]} == {("exact_match", 0.5), ("loss", 1.25)}
    assert results[0]["dataset"]["type"] == "org/sql-pairs" and results[0]["task"]["type"] == "text-generation"
    assert front["hotswap"]["ref"] == "sql@1" and front["hotswap"]["digest"] == version.digest
    assert front["hotswap"]["kind"] == "adapter"
    for expected in ("sql@1", version.digest, "text-to-sql", "tiny@1", "LORA rank 4", "org/sql-pairs",
                     "hotswap hub pull org/sql-card@v1 --name sql", 'revision="v1"'):
        assert expected in body

    # a sequence classifier (here a full one) is a text-classification model on the Hub
    from transformers import LlamaForSequenceClassification

    LlamaForSequenceClassification.from_pretrained(tiny_base_dir, num_labels=2).save_pretrained(tmp_path / "intent")
    registry.publish(tmp_path / "intent", name="intent", kind="model", base="tiny", metrics={"label_accuracy": 0.9})
    push_version(registry, "intent", "org/intent")
    front, _body = _card(hub.files_at("org/intent"))
    assert front["pipeline_tag"] == "text-classification" and front["library_name"] == "transformers"
    assert front["model-index"][0]["results"][0]["task"]["type"] == "text-classification"

    push_version(registry, "tiny", "org/tiny-copy")  # a base: transformers, derived from its source
    front, body = _card(hub.files_at("org/tiny-copy"))
    assert front["library_name"] == "transformers" and front["base_model"] == TINY_SOURCE
    assert front["hotswap"]["kind"] == "base" and front["hotswap"]["source"] == TINY_SOURCE
    assert "language" not in front and "model-index" not in front


def test_a_classifier_adapter_card_loads_it_on_a_classification_model(hub, registry, tiny_base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification.from_pretrained(tiny_base_dir, num_labels=2)
    model.name_or_path = TINY_SOURCE
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    get_peft_model(model, config).save_pretrained(tmp_path / "intent-lora")
    registry.publish(tmp_path / "intent-lora", name="intent", base="tiny")
    push_version(registry, "intent", "org/intent-lora")
    front, body = _card(hub.files_at("org/intent-lora"))
    assert front["pipeline_tag"] == "text-classification" and front["library_name"] == "peft"
    assert f'base = AutoModelForSequenceClassification.from_pretrained("{TINY_SOURCE}")' in body
    assert "AutoModelForCausalLM" not in body


def test_tag_pins_a_version_and_repush_is_a_no_op(hub, registry, other_registry, make_adapter, tmp_path):
    first_dir = make_adapter(seed=3)
    (first_dir / "notes.txt").write_text("only in version 1\n")
    first = registry.publish(first_dir, name="sql").version
    second = registry.publish(make_adapter(seed=4), name="sql").version
    one = push_version(registry, "sql@1", "org/sql")
    two = push_version(registry, "sql@2", "org/sql")
    repo = hub.repos["org/sql"]
    assert repo.tags == {"v1": one["commit"], "v2": two["commit"]} and repo.branches["main"] == two["commit"]
    assert "notes.txt" in hub.files_at("org/sql", "v1") and "notes.txt" not in hub.files_at("org/sql", "main")

    commits_before = len(repo.commits)
    again = push_version(registry, "sql@1", "org/sql")
    assert (again["created"], again["commit"]) == (False, one["commit"])
    assert len(repo.commits) == commits_before and repo.branches["main"] == two["commit"]

    assert pull_version(other_registry, "org/sql@v1", "by-tag").version.digest == first.digest
    assert pull_version(other_registry, "org/sql", "by-branch").version.digest == second.digest
    by_commit = pull_version(other_registry, f"org/sql@{one['commit']}", "by-commit").version
    assert by_commit.digest == first.digest and by_commit.metadata.lineage["commit"] == one["commit"]


def test_a_tag_holding_other_files_is_never_moved(hub, registry, make_adapter):
    registry.publish(make_adapter(seed=5), name="sql")
    registry.publish(make_adapter(seed=6), name="chat")
    push_version(registry, "sql@1", "org/shared")
    with pytest.raises(RemoteError, match=r"org/shared already has tag v1 on other files.*adapter_model"):
        push_version(registry, "chat@1", "org/shared")
    assert hub.files_at("org/shared", "v1") == hub.files_at("org/shared", "main")  # nothing committed


def test_pull_refuses_pickle_files_before_downloading(hub, registry, make_adapter, tmp_path):
    folder = make_adapter(seed=7)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    _upload_folder(hub, "org/pickled", folder)
    with pytest.raises(UnsafeContent, match=r"pickle files \(adapter_model\.bin\).*only safetensors.*convert it"):
        pull_version(registry, "org/pickled", "pickled")
    assert not any("/resolve/" in path for _, path, _ in hub.requests)
    assert not list(registry.home.glob(".pull-*"))
    assert [v.name for v in registry.list()] == ["tiny"]


def test_fetch_repo_gives_plain_files_matching_the_patterns(hub, make_adapter, tmp_path):
    folder = make_adapter(seed=15)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    commit = _upload_folder(hub, "org/mixed", folder)
    dest = tmp_path / "fetched"
    assert fetch_repo("org/mixed", None, dest, allow_patterns=["*.json", "*.safetensors"]) == commit
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert (dest / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()


def test_pull_refuses_an_adapter_that_does_not_fit_its_base(hub, registry, make_adapter, tmp_path):
    wider = save_tiny_base(tmp_path / "wider-base", hidden=128)
    _upload_folder(hub, "org/misfit", make_adapter(seed=8, base_dir=wider))  # names org/tiny-llama as its base
    with pytest.raises(IncompatibleAdapter, match=r"q_proj.*shape"):
        pull_version(registry, "org/misfit", "misfit")
    assert [v.name for v in registry.list()] == ["tiny"]


@pytest.mark.parametrize("front", ["base_model: [unclosed", "- a list\n- not a mapping"])
def test_pull_refuses_a_card_with_unreadable_front_matter(hub, registry, tiny_base_dir, tmp_path, front):
    folder = shutil.copytree(tiny_base_dir, tmp_path / "badcard")
    (folder / "README.md").write_text(f"---\n{front}\n---\n# card\n")
    _upload_folder(hub, "org/badcard", folder)
    with pytest.raises(InvalidMetadata, match=r"model card \(README.md\) of org/badcard has unreadable front matter"):
        pull_version(registry, "org/badcard", "badcard")
    assert [v.ref for v in registry.list()] == ["tiny@1"]


def test_pull_matches_the_base_named_by_the_card(hub, registry, other_registry, make_adapter, tmp_path):
    folder = make_adapter(seed=9)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/somewhere/local/snapshot"  # trained from a local folder
    (folder / "adapter_config.json").write_text(json.dumps(config))
    registry.publish(folder, name="sql", base="tiny")
    push_version(registry, "sql", "org/sql")  # the card names the base's source id, org/tiny-llama
    other_registry.publish(save_tiny_base(tmp_path / "decoy", seed=1), name="decoy", kind="base", source="org/decoy")
    assert pull_version(other_registry, "org/sql", "sql").version.metadata.base == "tiny@1"

    lonely = Registry(tmp_path / "home3")
    lonely.publish(save_tiny_base(tmp_path / "lonely"), name="lonely", kind="base", source="org/lonely")
    with pytest.raises(NotFoundError, match=r"'/somewhere/local/snapshot' matches no base.*model card names "
                                            r"base_model 'org/tiny-llama'"):
        pull_version(lonely, "org/sql", "sql")
    assert pull_version(lonely, "org/sql", "sql", base="lonely").version.metadata.base == "lonely@1"


def test_bases_and_full_models_round_trip(hub, registry, make_adapter, tmp_path):
    model = registry.publish(save_tiny_base(tmp_path / "finetuned", seed=2), name="ft", kind="model", base="tiny",
                             metrics={"loss": 0.5}).version
    push_version(registry, "tiny", "org/tiny-mirror")
    push_version(registry, "ft", "org/ft")
    fresh = Registry(tmp_path / "fresh")
    base = pull_version(fresh, "org/tiny-mirror", "tiny").version
    original = registry.resolve("tiny")
    assert (base.kind, base.digest, base.metadata.fingerprint) == ("base", original.digest,
                                                                   original.metadata.fingerprint)
    assert base.metadata.source == TINY_SOURCE  # adapters naming org/tiny-llama find it
    pulled = pull_version(fresh, "org/ft", "ft").version
    assert (pulled.kind, pulled.digest, pulled.metadata.base) == ("model", model.digest, "tiny@1")
    assert pulled.metadata.metrics == {"loss": 0.5}
    assert fresh.publish(make_adapter(seed=14), name="sql").version.metadata.base == "tiny@1"


def test_errors_name_what_went_wrong(hub, registry, make_adapter, monkeypatch):
    with pytest.raises(NotFoundError, match=r"no repo 'org/missing' on http://127\.0\.0\.1"):
        pull_version(registry, "org/missing", "x")
    registry.publish(make_adapter(seed=10), name="sql")
    push_version(registry, "sql", "org/sql")
    with pytest.raises(NotFoundError, match=r"org/sql .*has no revision 'v9'.*tags: v1"):
        pull_version(registry, "org/sql@v9", "x")
    for bad in ("not-a-repo", "org/sql@", "../etc/passwd", "org/a/b"):
        with pytest.raises(InvalidName):
            pull_version(registry, bad, "x")
    with pytest.raises(InvalidName):
        pull_version(registry, "org/sql", "../escape")

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RemoteError, match=r"refused pushing to org/new \(HTTP 401\): set HF_TOKEN"):
        push_version(registry, "sql", "org/new")
    assert "org/new" not in hub.repos

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(RemoteError, match=r"cannot reach http://127\.0\.0\.1:\d+.*HF_ENDPOINT"):
        pull_version(registry, "org/sql", "x")


def test_offline_mode_reads_only_the_hugging_face_cache(hub, registry, other_registry, make_adapter, monkeypatch):
    version = registry.publish(make_adapter(seed=11), name="sql").version
    pushed = push_version(registry, "sql", "org/sql")
    snapshot_download("org/sql", revision="v1", endpoint=hub.url)  # an earlier download by another tool filled the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests_before = len(hub.requests)
    with pytest.raises(RemoteError, match="HF_HUB_OFFLINE is set: pushing to org/sql"):
        push_version(registry, "sql", "org/sql")
    with pytest.raises(RemoteError, match=r"HF_HUB_OFFLINE is set and org/other@main is not in the Hugging Face cache"):
        pull_version(other_registry, "org/other", "other")
    pulled = pull_version(other_registry, "org/sql@v1", "sql").version
    assert pulled.digest == version.digest and pulled.metadata.lineage["commit"] == pushed["commit"]
    assert len(hub.requests) == requests_before  # nothing went over the network


def test_offline_pull_refuses_a_partly_cached_revision(hub, registry, other_registry, make_adapter, monkeypatch):
    registry.publish(make_adapter(seed=11), name="sql", task="text-to-sql", metrics={"em": 0.5})
    push_version(registry, "sql", "org/sql")
    # what PeftModel.from_pretrained("org/sql", revision="v1") leaves in the cache: two files, no card
    for path in ("adapter_config.json", "adapter_model.safetensors"):
        hf_hub_download("org/sql", path, revision="v1", endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RemoteError, match=r"org/sql@v1 is not completely in the local Hugging Face cache.*"
                                          r"pull it without HF_HUB_OFFLINE"):
        pull_version(other_registry, "org/sql@v1", "sql")
    assert [v.name for v in other_registry.list()] == ["tiny"]
    assert not list(other_registry.home.glob(".pull-*"))


def test_offline_pull_refuses_a_snapshot_missing_a_listed_file(hub, other_registry, registry, make_adapter,
                                                               monkeypatch):
    registry.publish(make_adapter(seed=11), name="sql")
    push_version(registry, "sql", "org/sql")
    cached = Path(snapshot_download("org/sql", revision="v1", endpoint=hub.url))
    (cached / "README.md").unlink()  # an interrupted download, or a cleaned-up cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RemoteError, match="not completely in the local Hugging Face cache"):
        pull_version(other_registry, "org/sql@v1", "sql")
    assert [v.name for v in other_registry.list()] == ["tiny"]


def test_offline_fetch_takes_only_the_files_the_patterns_select(hub, make_adapter, tmp_path, monkeypatch):
    folder = make_adapter(seed=15)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    (folder / "notes.md").write_text("x")
    commit = _upload_folder(hub, "org/mixed", folder)
    snapshot_download("org/mixed", endpoint=hub.url)  # the whole repo in the cache (another tool)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    dest = tmp_path / "fetched"
    assert fetch_repo("org/mixed", None, dest, allow_patterns=["*.json", "*.safetensors"]) == commit
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    with pytest.raises(UnsafeContent, match=r"pickle files \(adapter_model\.bin\)"):
        fetch_repo("org/mixed", None, tmp_path / "all")
    assert not (tmp_path / "all").exists()


def test_offline_fetch_refuses_a_listing_that_leaves_the_folder(hub, make_adapter, tmp_path, monkeypatch):
    """The cached listing names what is copied: a tampered one must not write outside the download."""
    _upload_folder(hub, "org/listed", make_adapter(seed=16))
    snapshot_download("org/listed", endpoint=hub.url)
    real = remote._cached_file_list
    monkeypatch.setattr(remote, "_cached_file_list", lambda *a: real(*a) + ["../escaped.json"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UnsafeContent, match=r"org/listed@main lists paths that leave its folder: '\.\./escaped\.json'"):
        fetch_repo("org/listed", None, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not (tmp_path / "escaped.json").exists()


def test_cli_push_and_pull(hub, registry, other_registry, make_adapter, capsys):
    version = registry.publish(make_adapter(seed=12), name="sql", task="text-to-sql").version
    main(["hub", "push", "sql@1", "--repo-id", "org/sql-cli", "--home", str(registry.home), "--json"])
    pushed = json.loads(capsys.readouterr().out)
    assert (pushed["ref"], pushed["tag"], pushed["repo_id"]) == ("sql@1", "v1", "org/sql-cli")
    main(["hub", "pull", "org/sql-cli@v1", "--name", "sql", "--alias", "prod", "--home", str(other_registry.home),
          "--json"])
    pulled = json.loads(capsys.readouterr().out)
    assert (pulled["ref"], pulled["digest"], pulled["created"]) == ("sql@1", version.digest, True)
    assert pulled["metadata"]["lineage"]["pulled_from"] == "org/sql-cli" and pulled["metadata"]["task"] == "text-to-sql"
    assert other_registry.aliases("sql") == {"latest": 1, "prod": 1}

    with pytest.raises(SystemExit) as exit_info:
        main(["hub", "pull", "org/nothing-here", "--name", "x", "--home", str(other_registry.home)])
    assert exit_info.value.code == 1 and "no repo 'org/nothing-here'" in capsys.readouterr().err


def test_cli_subprocess_takes_endpoint_and_token_from_the_environment(hub, registry, make_adapter):
    registry.publish(make_adapter(seed=13), name="sql")
    env = {**os.environ, "HOTSWAP_HOME": str(registry.home)}  # HF_ENDPOINT, HF_TOKEN, HF_HOME set by `hub`
    done = subprocess.run([sys.executable, "-m", "hotswap.hub.cli", "hub", "push", "sql", "--repo-id", "org/sub"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pushed sql@1 to org/sub (tag v1)" in done.stdout
    assert hub.repos["org/sub"].tags.keys() == {"v1"}
    writes = [auth for method, _, auth in hub.requests if method == "POST"]
    assert writes and all(auth == f"Bearer {TOKEN}" for auth in writes)


def test_import_base_from_a_hub_repo_id(hub, tmp_path, tiny_base_dir):
    """`hotswap hub import-base NAME ORG/NAME`: a plain HF repo (no hotswap card) becomes a base."""
    from hotswap.hub.importers import import_base

    commit = _upload_folder(hub, "org/tiny-llama", tiny_base_dir)
    fresh = Registry(tmp_path / "imported")
    version = import_base(fresh, "tiny", "org/tiny-llama").version
    assert (version.kind, version.metadata.source) == ("base", "org/tiny-llama")
    assert version.metadata.lineage == {"imported_from": "org/tiny-llama", "commit": commit}
    stored = {p: fresh.blobs.path(s).read_bytes() for p, s, _ in fresh.files(version)}
    assert stored == {p.name: p.read_bytes() for p in tiny_base_dir.iterdir() if p.is_file()}
    assert not list(fresh.home.glob(".import-*"))  # the download folder is gone
    with pytest.raises(NotFoundError):
        import_base(fresh, "other", "org/does-not-exist")
