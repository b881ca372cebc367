"""Snapshot folders: a version's files under their own names, as relative links into the blob store.

Several processes may open one version at the same moment, and each may be reading the folder
while another arrives. So a folder that already holds the right links is never removed or
replaced; one that does not (first use, or a folder left half-made by a killed process) is built
aside and renamed into place in one step, and a wrong one is renamed out of the way before that."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import HubError

Files = list[tuple[str, str, int]]  # (path in the version, sha256, size)


def snapshot_folder(root: Path, digest: str, files: Files, blob_path: Callable[[str], Path]) -> Path:
    """``root/<digest>``, holding a link per file to ``blob_path(sha)``; built if missing or wrong."""
    folder = root / digest
    if holds_links(folder, files, blob_path):
        return folder
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    for path, sha, _size in files:
        link = staging / path
        link.parent.mkdir(parents=True, exist_ok=True)
        # relative links: the home folder can be moved or mounted elsewhere
        os.symlink(os.path.relpath(blob_path(sha), (folder / path).parent), link)
    for _attempt in range(3):
        try:
            os.rename(staging, folder)  # refused while a folder with entries is there
            return folder
        except OSError:
            pass
        if holds_links(folder, files, blob_path):  # another process put the same links there first
            shutil.rmtree(staging, ignore_errors=True)
            return folder
        _move_aside(folder, root)
    shutil.rmtree(staging, ignore_errors=True)
    raise HubError(f"could not set up the snapshot folder {folder}: other processes keep replacing it")


def holds_links(folder: Path, files: Files, blob_path: Callable[[str], Path]) -> bool:
    return folder.is_dir() and all((folder / p).resolve() == blob_path(s).resolve() for p, s, _ in files)


def _move_aside(folder: Path, root: Path) -> None:
    """Take a wrong folder out of the way with one rename, then delete it."""
    aside = root / f".old-{uuid.uuid4().hex}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
