"""Rule 7: parallel publishers from several processes, and a publisher killed mid-way."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from hotswap.hub import InUseError, NotFoundError, Registry
from hotswap.hub.index import Index

from .conftest import first_in

PUBLISH = [sys.executable, "-m", "hotswap.hub.cli", "hub", "publish"]


def test_parallel_publishes_get_distinct_versions(registry, make_adapter):
    folders = [make_adapter(seed=seed) for seed in range(6)]
    procs = [subprocess.Popen([*PUBLISH, str(f), "--name", "sql", "--home", str(registry.home), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in folders]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(r["version"] for r in results) == [1, 2, 3, 4, 5, 6]
    assert all(r["created"] for r in results)
    # each version holds exactly the weights its own process published
    for folder, result in zip(folders, results):
        snap = registry.open(result["ref"])
        assert (snap.path / "adapter_model.safetensors").read_bytes() == \
            (folder / "adapter_model.safetensors").read_bytes()
    assert registry.resolve("sql").version == 6 and registry.verify() == []


def _big_checkpoint(folder, shards=60):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rng = np.random.default_rng(0)
    for i in range(shards):
        save_file({f"w{i}": rng.standard_normal((256, 1024), dtype=np.float32)}, folder / f"model-{i:03d}.safetensors")
    return folder


@pytest.mark.slow
def test_publish_killed_mid_way_leaves_no_partial_version(registry, tmp_path):
    folder = _big_checkpoint(tmp_path / "big")
    base_blobs = registry.blobs.all_digests()
    killed_mid_way = 0
    # kill once the publisher has stored 1, 20 and 45 of the 61 blobs: mid-way on any machine speed
    for stored in (1, 20, 45):
        proc = subprocess.Popen([*PUBLISH, str(folder), "--name", "big", "--kind", "base", "--home",
                                 str(registry.home)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if len(registry.blobs.all_digests() - base_blobs) >= stored:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with sqlite3.connect(registry.home / "index.sqlite") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        fresh = Registry(registry.home)
        try:
            version = fresh.resolve("big")
        except NotFoundError:
            written = len(fresh.blobs.all_digests() - base_blobs)
            killed_mid_way += 0 < written
            assert fresh.list(kind="base") == [fresh.resolve("tiny")]
        else:  # the publish finished before the kill: it must be whole
            assert len(fresh.files(version)) == 61 and fresh.verify("big") == []
            break
    assert killed_mid_way >= 1, "no kill landed while blobs were being written"
    done = Registry(registry.home).publish(folder, name="big", kind="base")
    assert done.version.version == 1 and Registry(registry.home).verify() == []
    Registry(registry.home).gc()  # orphans and temporaries of the killed runs go
    assert not list((registry.home / "blobs" / "tmp").iterdir())


def test_a_snapshot_folder_another_process_just_built_is_kept(registry, monkeypatch):
    """The race behind a flaky parallel publish: a process finds no folder, another builds it and
    starts reading, then the first would replace it. The folder must stay in place, whole."""
    from hotswap.hub import snapshots

    folder = registry.open("tiny").path
    inode = folder.stat().st_ino
    # the first look happens before the other process's folder appeared
    monkeypatch.setattr(snapshots, "holds_links", _first_false(snapshots.holds_links))
    assert registry.open("tiny").path == folder
    assert folder.stat().st_ino == inode and sorted(p.name for p in folder.iterdir()) == \
        sorted(p for p, _, _ in registry.files("tiny"))
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_wrong_snapshot_folder_is_replaced(registry):
    snap = registry.open("tiny")
    first = sorted(snap.path.iterdir())[0]
    first.unlink()
    first.symlink_to("nowhere")
    fixed = registry.open("tiny").path
    assert fixed == snap.path and (fixed / first.name).resolve() == registry.blobs.path(
        next(s for p, s, _ in registry.files("tiny") if p == first.name)).resolve()
    assert not [p for p in fixed.parent.iterdir() if p.name.startswith(".")]


def _first_false(real):
    calls = []

    def holds_links(*args):
        calls.append(args)
        return False if len(calls) == 1 else real(*args)
    return holds_links


def test_gc_leaves_alone_the_snapshot_another_process_is_building(registry, monkeypatch):
    """`hotswap hub gc` in another process runs while open() is making the links of a version."""
    shutil.rmtree(registry.open("tiny").path)
    other = Registry(registry.home)
    monkeypatch.setattr(os, "symlink", _after_links(2, os.symlink, other.gc))
    snap = registry.open("tiny")
    assert sorted(p.name for p in snap.path.iterdir()) == sorted(p for p, _, _ in registry.files("tiny"))


def test_a_staging_folder_emptied_mid_build_is_never_put_in_place(registry, monkeypatch):
    """Should a staging folder still be deleted mid-way (by an older gc), the half-filled folder that
    the next links would make is built again instead of being renamed into place."""
    shutil.rmtree(registry.open("tiny").path)
    staging = []
    monkeypatch.setattr(os, "symlink", _after_links(2, os.symlink, lambda: shutil.rmtree(staging[0]), staging))
    snap = registry.open("tiny")
    assert sorted(p.name for p in snap.path.iterdir()) == sorted(p for p, _, _ in registry.files("tiny"))
    assert all(p.resolve().is_file() for p in snap.path.iterdir())


def test_gc_removes_dead_snapshots_and_only_stale_staging_folders(registry):
    root = registry.open("tiny").path.parent
    dead, stale, fresh, aside = root / ("0" * 64), root / ".tmp-stale", root / ".tmp-fresh", root / ".old-x"
    for folder in (dead, stale, fresh, aside):
        folder.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    registry.gc()
    assert sorted(p.name for p in root.iterdir()) == sorted([registry.resolve("tiny").digest, fresh.name])


def test_an_alias_moved_onto_a_version_while_it_is_removed_is_not_left_dangling(registry, make_adapter, monkeypatch):
    registry.publish(make_adapter(seed=1), name="sql")
    registry.publish(make_adapter(seed=2), name="sql")
    other = Registry(registry.home)  # another process: `hotswap hub alias sql@1 prod`
    monkeypatch.setattr(Index, "transaction", first_in(registry, lambda: other.alias("sql@1", "prod")))
    with pytest.raises(InUseError, match="aliases prod point at it"):
        registry.remove("sql@1")
    assert other.resolve("sql@prod").ref == "sql@1"


def test_an_alias_is_never_pointed_at_a_version_removed_meanwhile(registry, make_adapter, monkeypatch):
    registry.publish(make_adapter(seed=1), name="sql")
    registry.publish(make_adapter(seed=2), name="sql")
    other = Registry(registry.home)  # another process: `hotswap hub rm sql@1`
    monkeypatch.setattr(Index, "transaction", first_in(registry, lambda: other.remove("sql@1")))
    with pytest.raises(NotFoundError, match="sql has no version 1"):
        registry.alias("sql@1", "prod")
    assert other.aliases("sql") == {"latest": 2}


def _after_links(count, real, action, made=None):
    """os.symlink that runs `action` once, right after the `count`th link (`made` collects the folders)."""
    calls = []

    def symlink(src, dst):
        real(src, dst)
        calls.append(dst)
        if made is not None:
            made.append(os.path.dirname(dst))
        if len(calls) == count:
            action()
    return symlink
