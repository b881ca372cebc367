"""Content-addressed blob store: each file is kept once, named by the sha256 of its bytes.

Writes go to a temporary file in the same filesystem and are renamed into place, so a process
killed mid-write leaves at most a stray temporary file, never a blob with the wrong content.

Every time a blob's bytes are hashed in full (written, or verified), its file status (size,
mtime, ctime, inode, device) is recorded beside it. ``check`` re-hashes only a blob whose status
changed since: any write, truncation, chmod or replacement of the file changes its ctime, which
user code cannot set back (git trusts its index the same way). Media corruption that leaves the
status alone is what ``verify`` (every byte re-hashed) is for."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from .errors import CorruptionError

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _status(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino} {st.st_dev}"


def _sync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Files by hash under `root/sha256/ab/abcdef...`; blobs are read-only once written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._verified = root / "verified"  # sha256 -> the file status when its bytes last hashed right

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, source: Path) -> tuple[str, int, bool]:
        """Store `source`; return (sha256, size, newly_written). Identical content is stored once;
        a stored copy that no longer hashes right is replaced, so publishing intact files heals it."""
        # Not mkstemp: its files are 0600 whatever the umask, and a blob keeps its temporary file's mode
        # (less the write bits), so the registry's files follow the umask as its folders do.
        tmp = self._tmp / f"put-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            target = self.path(sha)
            if target.is_file():
                try:
                    self.check(sha)
                    return sha, size, False
                except CorruptionError:  # the fresh bytes just hashed right: they replace the bad ones
                    pass
            new_folder = not target.parent.is_dir()
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, os.stat(tmp).st_mode & 0o444)  # read-only once written
            os.replace(tmp, target)
            # A rename is durable only once its folder is synced (a new folder's too, in its parent):
            # else the index, synced at commit, could name a blob that a power loss takes back.
            for folder in (target.parent, target.parent.parent)[: 1 + new_folder]:
                _sync_folder(folder)
            self._record(sha, _status(target))
            return sha, size, True
        finally:
            tmp.unlink(missing_ok=True)

    def verify(self, sha256: str) -> None:
        """Raise `CorruptionError` unless the blob exists and hashes to its name."""
        path = self.path(sha256)
        if not path.is_file():
            raise CorruptionError(f"blob {sha256[:12]} is missing from the store")
        self._forget(sha256)
        before = _status(path)
        actual = sha256_file(path)
        if actual != sha256:
            raise CorruptionError(f"blob {sha256[:12]} is corrupt: its bytes hash to {actual[:12]}")
        if _status(path) == before:  # a file changed while it was hashed gets no record
            self._record(sha256, before)

    def check(self, sha256: str) -> None:
        """``verify``, skipped when the file's status is what it was when its bytes last hashed right."""
        try:
            if self._record_path(sha256).read_text() == _status(self.path(sha256)):
                return
        except OSError:  # no record yet, or no blob: verify says which
            pass
        self.verify(sha256)

    def _record_path(self, sha256: str) -> Path:
        return self._verified / sha256

    def _record(self, sha256: str, status: str) -> None:
        """Remember the status of a blob whose bytes just hashed right (written aside, then renamed).
        Records only save re-hashes: one that cannot be written (a read-only home) is skipped."""
        try:
            self._verified.mkdir(exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="verified-")
            with os.fdopen(fd, "w") as out:
                out.write(status)
            os.replace(tmp_name, self._record_path(sha256))
        except OSError:
            pass

    def _forget(self, sha256: str) -> None:
        try:
            self._record_path(sha256).unlink(missing_ok=True)
        except OSError:  # a read-only home keeps no records it could not have written
            pass

    def all_digests(self) -> set[str]:
        base = self.root / "sha256"
        return {p.name for p in base.glob("*/*") if p.is_file()} if base.is_dir() else set()

    def remove(self, sha256: str) -> int:
        path = self.path(sha256)
        size = path.stat().st_size if path.exists() else 0
        self._forget(sha256)
        path.unlink(missing_ok=True)
        return size

    def clear_tmp(self) -> tuple[int, int]:
        """Drop temporaries left by killed writers (only safe when no publish is running); return
        (files, bytes) dropped."""
        left = [entry.stat().st_size for entry in os.scandir(self._tmp) if entry.is_file(follow_symlinks=False)]
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        return len(left), sum(left)
