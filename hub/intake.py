"""What may enter the registry: a folder scanned for safety before anything is stored.

Only safetensors weights are accepted (pickle files can run code when loaded); links that
leave the folder, special files and odd paths are refused."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UnsafeContent

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Files a folder may carry that are never part of a version (caches, editor and OS litter).
IGNORED_NAMES = {".DS_Store", "__pycache__", ".git", ".cache", ".gitattributes"}
MAX_FILES = 10_000

CONVERT_HINT = (
    "convert it to safetensors first, e.g. in Python: "
    "`model = PeftModel.from_pretrained(base, DIR); model.save_pretrained(OUT, safe_serialization=True)` "
    "(or `safetensors.torch.save_file(torch.load(FILE, weights_only=True), OUT_FILE)`)"
)


@dataclass(frozen=True, slots=True)
class StagedFile:
    """One file to store: its path inside the version, and where to read it now."""

    relpath: str
    source: Path


def scan_folder(folder: Path) -> list[StagedFile]:
    """List a folder's files for publishing, refusing anything unsafe (`UnsafeContent`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnsafeContent(f"{folder} is not a folder")
    root = folder.resolve()
    staged: list[StagedFile] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_NAMES)
        for dirname in dirnames:
            path = Path(dirpath) / dirname
            _check_inside(root, path, folder)
            if path.is_symlink():  # os.walk does not enter it: its files would silently be left out
                raise UnsafeContent(f"{path.relative_to(folder).as_posix()} is a link to a folder; copy the "
                                    "folder in its place (or link its files one by one)")
        for filename in sorted(filenames):
            if filename in IGNORED_NAMES:
                continue
            path = Path(dirpath) / filename
            relpath = path.relative_to(folder).as_posix()
            _check_inside(root, path, folder)
            if not path.is_file():
                raise UnsafeContent(f"{relpath} is not a regular file")
            if relpath.lower().endswith(PICKLE_SUFFIXES):
                raise UnsafeContent(
                    f"{relpath} is a pickle file, which can run code when loaded; only safetensors "
                    f"weights are accepted: {CONVERT_HINT}"
                )
            if not plain_relative(relpath):
                raise UnsafeContent(f"{relpath!r} is not a plain relative path")
            staged.append(StagedFile(relpath, path))
            if len(staged) > MAX_FILES:
                raise UnsafeContent(f"{folder} holds more than {MAX_FILES} files")
    if not staged:
        raise UnsafeContent(f"{folder} holds no files")
    return staged


def _check_inside(root: Path, path: Path, folder: Path) -> None:
    """A link is allowed only if it resolves inside the published folder."""
    if path.is_symlink():
        target = path.resolve()
        if target != root and root not in target.parents:
            rel = path.relative_to(folder).as_posix()
            raise UnsafeContent(f"{rel} is a link pointing outside the folder (to {target}); refusing it")


def plain_relative(relpath: str) -> bool:
    """A path that stays inside its folder on every platform: no absolute, empty, `.` or `..` parts."""
    return "\\" not in relpath and not relpath.startswith("/") and all(p not in ("", ".", "..") for p in relpath.split("/"))


def require_files(staged: list[StagedFile], kind: str, needed: dict[str, str]) -> None:
    """Refuse a folder that lacks a file its kind needs; `needed` maps a file name to why."""
    names = {s.relpath for s in staged}
    for name, why in needed.items():
        if name not in names:
            article = "an" if kind[0] in "aeiou" else "a"
            raise UnsafeContent(f"{article} {kind} folder must hold {name} ({why}); found: {', '.join(sorted(names))}")
