"""Snapshot folders: a version's files under their own names, as relative links into the blob store.

Several processes may open one version at the same moment, and each may be reading the folder
while another arrives. So a folder that already holds the right links is never removed or
replaced; one that does not (first use, or a folder left half-made by a killed process) is built
aside and renamed into place in one step, and a wrong one is renamed out of the way before that."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import HubError

Files = list[tuple[str, str, int]]  # (path in the version, sha256, size)
STAGING, ASIDE = ".tmp-", ".old-"  # folders being built, and wrong ones being deleted
STALE_AFTER_S = 3600  # a staging folder this old was left by a killed process
_DIGEST = re.compile(r"[0-9a-f]{64}")


def snapshot_folder(root: Path, digest: str, files: Files, blob_path: Callable[[str], Path]) -> Path:
    """``root/<digest>``, holding a link per file to ``blob_path(sha)``; built if missing or wrong."""
    folder = root / digest
    for _attempt in range(4):
        if holds_links(folder, files, blob_path):
            return folder
        staging = Path(tempfile.mkdtemp(dir=root, prefix=STAGING))
        try:
            for path, sha, _size in files:
                link = staging / path
                link.parent.mkdir(parents=True, exist_ok=True)
                # relative links: the home folder can be moved or mounted elsewhere
                os.symlink(os.path.relpath(blob_path(sha), (folder / path).parent), link)
        except OSError:  # the staging folder was taken away mid-way; the check below says so
            pass
        # Only a whole folder goes into place: had another process deleted the staging folder
        # mid-way, mkdir above would have made a new one holding only the links made since.
        if holds_links(staging, files, blob_path):
            try:
                os.rename(staging, folder)  # refused while a folder with entries is there
                return folder
            except OSError:
                pass
        shutil.rmtree(staging, ignore_errors=True)
        if not holds_links(folder, files, blob_path):  # else another process put the same links there first
            _move_aside(folder, root)
    raise HubError(f"could not set up the snapshot folder {folder}: other processes keep replacing it")


def holds_links(folder: Path, files: Files, blob_path: Callable[[str], Path]) -> bool:
    return folder.is_dir() and all((folder / p).resolve() == blob_path(s).resolve() for p, s, _ in files)


def prune(root: Path, live: set[str]) -> None:
    """Delete the folders of versions no longer in the index (`live` holds the digests of those that
    are), and the staging and set-aside folders that killed processes left. A staging folder younger
    than `STALE_AFTER_S` is another process's work in progress, and is left alone."""
    for entry in root.iterdir():
        if _DIGEST.fullmatch(entry.name):
            gone = entry.name not in live
        else:
            gone = entry.name.startswith(ASIDE) or (entry.name.startswith(STAGING) and _age(entry) > STALE_AFTER_S)
        if gone and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif gone:
            entry.unlink(missing_ok=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _move_aside(folder: Path, root: Path) -> None:
    """Take a wrong folder out of the way with one rename, then delete it."""
    aside = root / f"{ASIDE}{uuid.uuid4().hex}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
