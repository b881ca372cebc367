"""Races between processes sharing one home, each replayed deterministically: another process's
change is made at the exact moment between two steps of this one."""

import os
import time

import pytest

from hotswap.hub import InvalidMetadata, NotFoundError, Registry, scratch
from hotswap.hub.blobs import BlobStore
from hotswap.hub.index import Index

from .conftest import TINY_SOURCE, first_in, save_tiny_base


def _before_first(monkeypatch, registry, method, action):
    """Patch `Index.<method>` so that `action` runs once, just before `registry` first calls it."""
    real, done = getattr(Index, method), []

    def patched(self, *args):
        if self is registry._index and not done:
            done.append(True)
            action()
        return real(self, *args)
    monkeypatch.setattr(Index, method, patched)


def _deploy(other):
    """`hotswap hub alias sql@2 prod && hotswap hub rm sql@1`: the usual roll-forward."""
    other.alias("sql@2", "prod")
    other.remove("sql@1")


def test_a_reference_resolves_while_its_alias_moves_and_the_old_version_goes(registry, make_adapter, monkeypatch):
    registry.publish(make_adapter(seed=1), name="sql", aliases=["prod"])
    registry.publish(make_adapter(seed=2), name="sql")
    _before_first(monkeypatch, registry, "version", lambda: _deploy(Registry(registry.home)))
    # read before or after the move, never half of each ("sql has no version 1")
    assert registry.resolve("sql@prod").ref in ("sql@1", "sql@2")


def test_a_version_removed_while_it_is_opened_is_never_an_empty_folder(registry, make_adapter, monkeypatch):
    registry.publish(make_adapter(seed=1), name="sql", aliases=["prod"])
    registry.publish(make_adapter(seed=2), name="sql")
    _before_first(monkeypatch, registry, "files", lambda: _deploy(Registry(registry.home)))
    snap = registry.open("sql@prod")
    assert sorted(p.name for p in snap.path.iterdir()) == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors"]


def test_an_adapter_is_never_published_onto_a_base_removed_meanwhile(registry, make_adapter, tmp_path, monkeypatch):
    registry.publish(save_tiny_base(tmp_path / "base2", seed=1), name="tiny", kind="base", source=TINY_SOURCE)
    other = Registry(registry.home)  # another process: `hotswap hub rm tiny@1` (nothing is built on it yet)
    monkeypatch.setattr(Index, "transaction", first_in(registry, lambda: other.remove("tiny@1")))
    with pytest.raises(NotFoundError, match="tiny@1"):
        registry.publish(make_adapter(seed=1), name="sql", base="tiny@1")
    assert other.list(kind="adapter") == []


def test_one_name_never_holds_two_kinds_when_first_published_as_both_at_once(registry, make_adapter, tmp_path,
                                                                            monkeypatch):
    other = Registry(registry.home)  # another process publishes `sql` as a base at the same moment
    folder = save_tiny_base(tmp_path / "base2", seed=1)
    monkeypatch.setattr(Index, "transaction", first_in(registry, lambda: other.publish(folder, name="sql",
                                                                                          kind="base")))
    with pytest.raises(InvalidMetadata, match="sql is a base"):
        registry.publish(make_adapter(seed=1), name="sql")
    assert [v.kind for v in other.list()] == ["base", "base"]


def test_a_new_blob_survives_a_power_loss_once_published(registry, tmp_path, monkeypatch):
    """A renamed file is durable only once its folder is synced: the index, synced at commit, must
    never name a blob a power loss could take back."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    source = tmp_path / "weights.bin"
    source.write_bytes(b"new bytes")
    sha, _size, written = registry.blobs.put(source)
    assert written and str(registry.blobs.path(sha).parent) in synced


def test_gc_removes_the_downloads_of_killed_pulls_and_only_those(registry):
    long_ago = time.time() - 2 * scratch.GRACE_S
    killed = registry.home / ".pull-killed"  # its process died holding the lock, which died with it
    (killed / "files").mkdir(parents=True)
    (killed / "files" / "model.safetensors").write_bytes(b"downloaded")
    (killed / scratch.LOCK).touch()
    os.utime(killed / scratch.LOCK, (long_ago, long_ago))
    unlocked = registry.home / ".import-unlocked"  # killed before it took its lock
    unlocked.mkdir()
    os.utime(unlocked, (long_ago, long_ago))
    with scratch.scratch_folder(registry.home, ".pull-") as running:
        os.utime(running / scratch.LOCK, (long_ago, long_ago))  # a long download: only its lock tells
        starting = registry.home / ".pull-starting"  # created a moment ago, about to take its lock
        starting.mkdir()
        # another process; it counts what it freed: the killed pull's file and its lock
        assert Registry(registry.home).gc() == (2, len(b"downloaded"))
        assert sorted(p.name for p in registry.home.iterdir() if p.name.startswith(scratch.PREFIXES)) == \
            sorted([running.name, starting.name])
    assert not running.exists()


def test_gc_counts_the_half_written_blobs_it_removes(registry):
    """A publish killed while writing leaves a temporary file as large as the file it was storing:
    gc removes it and says so (not "removed 0 files, 0 B")."""
    (registry.blobs.root / "tmp" / "put-killed").write_bytes(b"x" * 1000)
    assert registry.gc() == (1, 1000)
    assert not list((registry.blobs.root / "tmp").iterdir())


def _remove_and_collect_before_first_hash(monkeypatch, registry):
    """Another process runs `hotswap hub rm sql@1 && hotswap hub gc` as soon as this one starts hashing."""
    other, real, done = Registry(registry.home), BlobStore.verify, []

    def verify(self, sha):
        if self is registry.blobs and not done:
            done.append(True)
            other.remove("sql@1")
            other.gc()
        return real(self, sha)
    monkeypatch.setattr(BlobStore, "verify", verify)


def test_verify_reports_no_damage_for_a_version_removed_and_collected_meanwhile(registry, make_adapter, monkeypatch):
    registry.publish(make_adapter(seed=1), name="sql")
    registry.publish(make_adapter(seed=2), name="sql")
    _remove_and_collect_before_first_hash(monkeypatch, registry)
    assert registry.verify() == []


def test_opening_a_version_removed_and_collected_meanwhile_is_not_found_not_corrupt(registry, make_adapter,
                                                                                    monkeypatch):
    registry.publish(make_adapter(seed=1), name="sql")
    registry.publish(make_adapter(seed=2), name="sql")
    for sha in registry.blobs.all_digests():  # no status records: open re-hashes every file
        registry.blobs._forget(sha)
    _remove_and_collect_before_first_hash(monkeypatch, registry)
    with pytest.raises(NotFoundError, match="sql@1 was removed"):
        registry.open("sql@1")


def test_two_rollbacks_at_once_undo_two_moves(registry, make_adapter, monkeypatch):
    for seed in (1, 2):
        registry.publish(make_adapter(seed=seed), name="sql")
    registry.alias("sql@1", "prod")
    registry.alias("sql@2", "prod")
    other = Registry(registry.home)  # another operator's `hotswap hub rollback sql prod`, just before this one's
    monkeypatch.setattr(Index, "transaction", first_in(registry, lambda: other.rollback("sql", "prod")))
    assert registry.rollback("sql", "prod").ref == "sql@2"  # undoes the other's move, as run one after the other
    assert [(e.from_version, e.to_version) for e in registry.alias_history("sql") if e.alias == "prod"] == [
        (None, 1), (1, 2), (2, 1), (1, 2)]


def test_threads_sharing_one_registry_take_turns_on_its_connection(registry, make_adapter, monkeypatch):
    """A server's request and loader threads share one Registry: an alias move starting while another
    thread's resolve holds its read transaction waits for it (a second BEGIN on the connection would fail)."""
    import threading

    registry.publish(make_adapter(seed=1), name="sql", aliases=["prod"])
    registry.publish(make_adapter(seed=2), name="sql")
    inside, moved, errors = threading.Event(), [], []

    def move():
        inside.wait(10)
        try:
            moved.append(registry.alias("sql@2", "prod").ref)
        except Exception as exc:  # noqa: BLE001 - what a second BEGIN raised
            errors.append(exc)
    mover = threading.Thread(target=move)
    mover.start()
    real = Index.version

    def version_then_wait(self, *args):
        if not inside.is_set():
            inside.set()
            time.sleep(0.3)  # the other thread tries its move meanwhile
        return real(self, *args)
    monkeypatch.setattr(Index, "version", version_then_wait)
    assert registry.resolve("sql@prod").ref == "sql@1"
    mover.join(10)
    assert errors == [] and moved == ["sql@2"] and registry.resolve("sql@prod").ref == "sql@2"
