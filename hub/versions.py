"""The typed, plain objects the registry hands out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .metadata import EntryMetadata


@dataclass(frozen=True, slots=True)
class Version:
    """One immutable version of a named entry."""

    name: str
    version: int
    kind: str
    digest: str
    metadata: EntryMetadata
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A verified version laid out as a folder of its files under their own names (read-only)."""

    version: Version
    path: Path


@dataclass(frozen=True, slots=True)
class PublishResult:
    """`created` is False when the content was identical to an existing version (nothing stored)."""

    version: Version
    created: bool


@dataclass(frozen=True, slots=True)
class Problem:
    """A finding of `verify`: which version, which file, what is wrong."""

    ref: str
    path: str
    message: str


def version_digest(files: list[tuple[str, str]]) -> str:
    """sha256 over the sorted (path, blob sha256) pairs: the identity of a version's content."""
    digest = hashlib.sha256()
    for path, sha in sorted(files):
        digest.update(f"{path}\0{sha}\n".encode())
    return digest.hexdigest()


def weights_fingerprint(files: list[tuple[str, str]]) -> str:
    """Digest of a checkpoint's config and weights only (tokenizer or card edits don't change it)."""
    kept = [(p, s) for p, s in files if p == "config.json" or p.endswith(".safetensors")]
    return "sha256:" + version_digest(kept)
