"""Working folders inside the registry home (a repo being pulled or imported, before its publish).

Each holds a lock while its process uses it, so `gc` can tell the folders of killed processes
(whose files would otherwise stay in the home for good) from those of running ones: a lock nobody
holds means the owner is gone. A folder is only taken for abandoned after a grace period, since
its owner creates it a moment before it can take the lock."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIXES = (".pull-", ".import-")
LOCK = ".owner.lock"
GRACE_S = 60.0


@contextmanager
def scratch_folder(home: Path, prefix: str) -> Iterator[Path]:
    """A new folder ``home/<prefix>...``, locked while in use and deleted afterwards."""
    assert prefix in PREFIXES, prefix  # gc looks for these only
    folder = Path(tempfile.mkdtemp(dir=home, prefix=prefix))
    try:
        with open(folder / LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the process ends, however it ends
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prune(home: Path) -> tuple[int, int]:
    """Delete the working folders whose process is gone; return (files, bytes) deleted."""
    files = size = 0
    for folder in home.iterdir():
        if folder.name.startswith(PREFIXES) and folder.is_dir() and not folder.is_symlink() and _abandoned(folder):
            found, found_size = tree_size(folder)
            shutil.rmtree(folder, ignore_errors=True)
            files, size = files + found, size + found_size
    return files, size


def tree_size(folder: Path) -> tuple[int, int]:
    """(files, bytes) under ``folder``, links not followed (what deleting it frees)."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            try:
                size += os.lstat(os.path.join(dirpath, name)).st_size
                files += 1
            except FileNotFoundError:
                pass
    return files, size


def _abandoned(folder: Path) -> bool:
    lock = folder / LOCK
    try:
        with open(lock) as handle:
            if _age(lock) < GRACE_S:
                return False
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is still at work
                return False
            return True
    except FileNotFoundError:  # killed before it took its lock, or still about to take it
        return _age(folder) >= GRACE_S


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0
