"""Rule 6: only safetensors, names are identifiers, nothing outside the folder, digests verified."""

import os
import shutil

import pytest

from hotswap.hub import CorruptionError, InvalidName, UnsafeContent

from .conftest import TINY_SOURCE


def test_pickle_refused_with_conversion_hint(registry, make_adapter):
    folder = make_adapter()
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(UnsafeContent, match=r"adapter_model\.bin is a pickle file.*safetensors.*save_pretrained"):
        registry.publish(folder, name="pickled")
    (folder / "adapter_model.bin").rename(folder / "training_args.pt")
    with pytest.raises(UnsafeContent, match="training_args.pt is a pickle"):
        registry.publish(folder, name="pickled")


@pytest.mark.parametrize("name", ["../x", "/abs/path", "a/b", "UPPER", ".hidden", "x" * 65])
def test_names_are_identifiers_not_paths(registry, make_adapter, name):
    with pytest.raises(InvalidName):
        registry.publish(make_adapter(), name=name)
    assert not (registry.home.parent / "x").exists()


def test_symlink_pointing_outside_refused(registry, make_adapter, tmp_path):
    folder = make_adapter()
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    os.symlink(secret, folder / "notes.txt")
    with pytest.raises(UnsafeContent, match="notes.txt is a link pointing outside the folder"):
        registry.publish(folder, name="linky")
    os.unlink(folder / "notes.txt")
    os.symlink(tmp_path, folder / "escape")  # a linked folder outside
    with pytest.raises(UnsafeContent, match="escape is a link pointing outside"):
        registry.publish(folder, name="linky")


def test_symlink_inside_folder_is_stored_as_its_content(registry, make_adapter):
    folder = make_adapter()
    (folder / "docs").mkdir()
    (folder / "docs" / "card.md").write_text("hello")
    os.symlink("docs/card.md", folder / "CARD.md")
    version = registry.publish(folder, name="linky").version
    snap = registry.open(version)
    assert (snap.path / "CARD.md").read_text() == "hello" and (snap.path / "docs" / "card.md").is_file()


def test_open_rehashes_only_blobs_whose_file_changed_since_their_last_hash(registry, make_adapter, monkeypatch):
    from hotswap.hub import blobs

    version = registry.publish(make_adapter(), name="sql").version
    hashed = []
    real = blobs.sha256_file
    monkeypatch.setattr(blobs, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    registry.open("sql")
    assert hashed == []  # hashed when written, unchanged since
    weights = next(sha for path, sha, _ in registry.files(version) if path == "adapter_model.safetensors")
    os.chmod(registry.blobs.path(weights), 0o444)  # same mode, new ctime: the status changed
    registry.open("sql")
    assert hashed == [weights]
    registry.open("sql")
    assert hashed == [weights]  # hashed right, recorded again
    shutil.rmtree(registry.blobs.root / "verified")  # records lost: every file is hashed once more
    registry.open("sql")
    assert sorted(hashed[1:]) == sorted(sha for _, sha, _ in registry.files(version))


def test_a_tampered_blob_is_caught_on_open_even_with_its_mtime_put_back(registry, make_adapter):
    version = registry.publish(make_adapter(), name="sql").version
    weights = next(sha for path, sha, _ in registry.files(version) if path == "adapter_model.safetensors")
    blob = registry.blobs.path(weights)
    before = os.stat(blob)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    os.chmod(blob, 0o444)
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, mode and mtime; ctime moved on
    with pytest.raises(CorruptionError, match=r"sql@1: file adapter_model\.safetensors: blob .* is corrupt"):
        registry.open("sql")
    with pytest.raises(CorruptionError):  # a failed check leaves no record behind
        registry.open("sql")


def test_missing_weights_refused(registry, make_adapter):
    folder = make_adapter()
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UnsafeContent, match="^an adapter folder must hold adapter_model.safetensors"):
        registry.publish(folder, name="empty")


def test_tampered_blob_caught_on_read_and_by_verify(registry, make_adapter):
    version = registry.publish(make_adapter(), name="sql").version
    assert registry.verify() == []
    weights = next(sha for path, sha, _ in registry.files(version) if path == "adapter_model.safetensors")
    blob = registry.blobs.path(weights)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match=r"sql@1: file adapter_model\.safetensors: blob .* is corrupt"):
        registry.open("sql")
    # a reader that hashes what it reads itself (the serving engine) may skip the re-hash
    assert registry.open("sql", verify=False).version.ref == "sql@1"
    problems = registry.verify("sql")
    assert [(p.ref, p.path) for p in problems] == [("sql@1", "adapter_model.safetensors")]
    assert [p.ref for p in registry.verify()] == ["sql@1"]  # the base is still fine


def test_missing_blob_reported(registry, make_adapter):
    version = registry.publish(make_adapter(), name="sql").version
    _, sha, _ = registry.files(version)[0]
    registry.blobs.path(sha).unlink()
    assert "missing" in registry.verify("sql")[0].message


def test_snapshot_rebuilt_if_tampered_with(registry, make_adapter):
    registry.publish(make_adapter(), name="sql")
    snap = registry.open("sql")
    shutil.rmtree(snap.path)
    assert (registry.open("sql").path / "adapter_config.json").is_file()


def _corrupt(registry, ref: str, path: str) -> str:
    sha = next(s for p, s, _ in registry.files(ref) if p == path)
    blob = registry.blobs.path(sha)
    os.chmod(blob, 0o644)
    blob.write_text("garbage")
    os.chmod(blob, 0o444)
    return sha


def test_publishing_intact_files_again_heals_a_corrupt_blob(registry, tiny_base_dir):
    sha = _corrupt(registry, "tiny", "config.json")
    assert [(p.ref, p.path) for p in registry.verify()] == [("tiny@1", "config.json")]
    again = registry.publish(tiny_base_dir, name="tiny", kind="base", source=TINY_SOURCE)
    assert (again.version.ref, again.created) == ("tiny@1", False)
    assert registry.verify() == [] and registry.open("tiny").version.ref == "tiny@1"

    _corrupt(registry, "tiny", "config.json")  # the same files under a new name are whole from the start
    twin = registry.publish(tiny_base_dir, name="twin", kind="base", source=TINY_SOURCE).version
    assert registry.open(twin).version.ref == "twin@1" and registry.verify() == []
    assert registry.blobs.path(sha).read_bytes() == (tiny_base_dir / "config.json").read_bytes()


def test_a_link_to_a_folder_inside_is_refused_naming_it(registry, tiny_base_dir, tmp_path):
    folder = shutil.copytree(tiny_base_dir, tmp_path / "linked")
    (folder / "docs").mkdir()
    (folder / "docs" / "card.md").write_text("hello")
    os.symlink("docs", folder / "more-docs")  # os.walk would not enter it: its files would go missing
    with pytest.raises(UnsafeContent, match="more-docs is a link to a folder"):
        registry.publish(folder, name="linked", kind="base")
    assert [v.ref for v in registry.list()] == ["tiny@1"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o444), (0o077, 0o400)])
def test_blobs_are_read_only_and_follow_the_umask(registry, make_adapter, umask, mode):
    """A registry kept private by its owner's umask keeps its files private too: a blob is readable by
    whom the umask allows, writable by nobody."""
    folder = make_adapter()
    old = os.umask(umask)
    try:
        version = registry.publish(folder, name="sql").version
    finally:
        os.umask(old)
    for _, sha, _ in registry.files(version):
        assert os.stat(registry.blobs.path(sha)).st_mode & 0o777 == mode
