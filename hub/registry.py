"""`Registry`: the one public entry to the store. Trainer and server use only this class.

Layout under `home`: `index.sqlite` (names, versions, aliases), `blobs/` (files by sha256),
`snapshots/<digest>/` (each version's files under their own names, as links into `blobs/`)."""

from __future__ import annotations

import builtins  # `list` below is also a method's name, which a type checker reads there
import difflib
import fcntl
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from . import describe
from .blobs import BlobStore
from .errors import CorruptionError, HubError, InUseError, InvalidMetadata, NotFoundError
from .index import AliasEvent, Index, VersionRow
from .intake import scan_folder
from .metadata import KINDS, read_stored
from .refs import LATEST, Ref, check_alias, check_identifier, parse_ref
from .scratch import prune as prune_scratch
from .snapshots import prune as prune_snapshots, snapshot_folder
from .versions import Problem, PublishResult, Snapshot, Version, version_digest, weights_fingerprint


def default_home() -> Path:
    """`$HOTSWAP_HOME`, else the per-user data folder."""
    if env := os.environ.get("HOTSWAP_HOME"):
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "hotswap"


class Registry:
    """Immutable, content-addressed versions of bases, adapters and full models, with aliases."""

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()
        if self.home.exists() and not self.home.is_dir():
            raise HubError(f"the registry home {self.home} is a file, not a folder")
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent that is a file, a read-only disk, ...
            raise HubError(f"cannot make the registry home {self.home}: {exc.strerror or exc}") from None
        self.blobs = BlobStore(self.home / "blobs")
        self._index = Index(self.home / "index.sqlite")
        self._snapshots = self.home / "snapshots"
        self._snapshots.mkdir(exist_ok=True)

    def close(self) -> None:
        self._index.close()

    # --- resolving ----------------------------------------------------------------------
    def resolve(self, ref: str | Ref | Version) -> Version:
        """The version a reference names now (aliases are read at call time)."""
        if isinstance(ref, Version):
            return ref
        parsed = ref if isinstance(ref, Ref) else parse_ref(ref)
        with self._index.reading():  # one state of the index: an alias and the version it names agree
            if self._index.entry_kind(parsed.name) is None:
                close = difflib.get_close_matches(parsed.name, self._index.names(), n=3, cutoff=0.5)
                raise NotFoundError(f"no entry named {parsed.name!r} in the registry", close)
            number = parsed.version
            if number is None:
                number = self._index.alias_target(parsed.name, parsed.alias or LATEST)
                if number is None:
                    known = sorted(self._index.aliases(parsed.name))
                    raise NotFoundError(f"{parsed.name} has no alias {parsed.alias!r} "
                                        f"(aliases: {', '.join(known) or 'none'})")
            row = self._index.version(parsed.name, number)
            if row is None:
                have = [str(r.version) for r in self._index.versions(parsed.name)]
                raise NotFoundError(f"{parsed.name} has no version {number} (versions: {', '.join(have) or 'none'})")
            return _to_version(row)

    def open(self, ref: str | Ref | Version, verify: bool = True) -> Snapshot:
        """Check every file of a version against its digest and return the version as a folder.

        A file is re-hashed unless its status is unchanged since its bytes last hashed right (see
        ``BlobStore.check``); ``verify()`` re-hashes everything. ``verify=False`` skips the check,
        for a caller that hashes the very bytes it reads against ``files()`` itself.
        """
        with self._index.reading():  # the version and its files as of one moment
            version = self.resolve(ref)
            files = self._index.files(version.name, version.version)
        for path, sha, _size in files if verify else ():
            try:
                self.blobs.check(sha)
            except CorruptionError as exc:
                if self._removed(version):  # and its blobs collected meanwhile: no damage
                    raise NotFoundError(f"{version.ref} was removed while it was being opened") from None
                raise CorruptionError(f"{version.ref}: file {path}: {exc}") from None
        return Snapshot(version, snapshot_folder(self._snapshots, version.digest, files, self.blobs.path))

    # --- publishing ---------------------------------------------------------------------
    def publish(
        self,
        folder: Path | str,
        name: str,
        kind: str = "adapter",
        base: str | None = None,
        task: str | None = None,
        language: str | None = None,
        tags: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
        lineage: dict[str, Any] | None = None,
        aliases: Iterable[str] = (),
        source: str | None = None,
    ) -> PublishResult:
        """Store a folder as the next version of `name` after the safety and compatibility checks."""
        check_identifier(name, "name")
        aliases = [check_alias(a) for a in aliases]
        _known_kind(kind)
        self._check_kind(name, kind)
        staged = scan_folder(Path(folder))
        fields: dict[str, Any] = dict(kind=kind, task=task, language=language, tags=tags, metrics=metrics,
                                      lineage=lineage, source=source)
        base_snap = self.open(base or self.match_base(describe.declared_base(staged))) if kind == "adapter" or base \
            else None
        if base_snap is not None and base_snap.version.kind != "base":  # before reading it as one
            raise InvalidMetadata(f"{base_snap.version.ref} is {_a(base_snap.version.kind)}, not a base")
        if kind == "adapter":
            fields |= describe.adapter_fields(staged, base_snap)
        else:
            fields |= describe.checkpoint_fields(staged, kind, base_snap)
        describe.build_metadata(fields)  # refuse bad metadata before any byte is stored

        with self._store_lock(exclusive=False):
            stored = [(s.relpath, *self.blobs.put(s.source)[:2]) for s in staged]
            pairs = [(p, sha) for p, sha, _ in stored]
            digest = version_digest(pairs)
            if kind != "adapter":
                fields["fingerprint"] = weights_fingerprint(pairs)
            fields["size_bytes"] = sum(size for _, _, size in stored)
            metadata = describe.build_metadata(fields)
            with self._index.transaction() as db:
                self._check_kind(name, kind)  # again: another process may have published meanwhile
                if base_snap is not None and self._removed(base_snap.version):
                    raise NotFoundError(f"{base_snap.version.ref} was removed while {name} was being published")
                same = db.execute("SELECT version FROM versions WHERE name = ? AND digest = ?", (name, digest)).fetchone()
                if same:
                    number, created = same[0], False
                else:
                    number = Index.insert_version(db, name, kind, digest, metadata.model_dump_json(),
                                                  metadata.created_at.isoformat(), stored)
                    created = True
                for alias in aliases:
                    Index.set_alias(db, name, alias, number)
                version = self.resolve(Ref(name, version=number))  # before a removal could slip in
        return PublishResult(version, created)

    def _check_kind(self, name: str, kind: str) -> None:
        existing = self._index.entry_kind(name)
        if existing is not None and existing != kind:
            raise InvalidMetadata(f"{name} is {_a(existing)}; it cannot take {_a(kind)} version")

    def match_base(self, source: str | None) -> str:
        """The base whose name or recorded source id is `source` (from an adapter's config)."""
        bases = [v for v in self.list(kind="base") if self._index.alias_target(v.name, LATEST) == v.version]
        for version in bases:
            if source and source in (version.name, version.metadata.source):
                return version.ref
        known = ", ".join(f"{v.name} ({v.metadata.source})" for v in bases) or "none"
        if not source:
            raise NotFoundError(f"the adapter names no base (base_model_name_or_path); pass --base (bases: {known})")
        raise NotFoundError(f"the adapter's base {source!r} matches no base in the registry; import it with "
                            f"`hotswap hub import-base` or pass --base (bases: {known})")

    @contextmanager
    def _store_lock(self, exclusive: bool) -> Iterator[None]:
        """Publishers share the lock; `gc` takes it alone so it never drops a blob mid-publish."""
        with open(self.home / "store.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- listing and aliases --------------------------------------------------------------
    def list(self, kind: str | None = None, task: str | None = None, language: str | None = None,
             base: str | None = None, tag: str | None = None) -> list[Version]:
        """Every version matching all the filters given (`tag` is `key` or `key=value`)."""
        if kind is not None:  # else an unknown kind lists nothing, which reads as "none of them"
            _known_kind(kind)
        found = []
        if base and "@" in base:  # an alias or `latest` means the version it names now
            base = self.resolve(base).ref
        for version in map(_to_version, self._index.versions()):
            meta = version.metadata
            key, _, value = (tag or "").partition("=")
            if (kind and version.kind != kind) or (task and meta.task != task) \
                    or (language and meta.language != language) \
                    or (base and meta.base != base and (meta.base or "").split("@")[0] != base) \
                    or (tag and (key not in meta.tags or (value and meta.tags[key] != value))):
                continue
            found.append(version)
        return found

    def versions(self, name: str) -> builtins.list[Version]:
        rows = self._index.versions(check_identifier(name))
        if not rows:
            self.resolve(name)  # raises NotFoundError with the nearest names
        return [_to_version(r) for r in rows]

    def aliases(self, name: str) -> dict[str, int]:
        return self._index.aliases(check_identifier(name))

    def alias_history(self, name: str) -> builtins.list[AliasEvent]:
        return self._index.alias_events(check_identifier(name))

    def alias(self, ref: str | Version, alias: str) -> Version:
        """Point `alias` at the version `ref` names now; the move is atomic and recorded."""
        check_alias(alias)
        if isinstance(ref, Version):  # looked up again: it may have been removed since
            ref = Ref(ref.name, version=ref.version)
        with self._index.transaction() as db:  # resolved under the lock: no removal can slip in between
            version = self.resolve(ref)
            Index.set_alias(db, version.name, alias, version.version)
        return version

    def unalias(self, name: str, alias: str) -> None:
        if alias == LATEST:
            raise InvalidMetadata("'latest' is maintained by publish and cannot be removed")
        with self._index.transaction() as db:
            if self._index.alias_target(check_identifier(name), alias) is None:
                raise NotFoundError(f"{name} has no alias {alias!r}")
            Index.set_alias(db, name, alias, None)

    def rollback(self, name: str, alias: str) -> Version:
        """Move `alias` back to where it pointed before its last move."""
        # The history is read inside the move's transaction: two rollbacks at once undo two moves,
        # instead of both reading the same last move and going back to the same version.
        with self._index.transaction() as db:
            moves = [e for e in self.alias_history(name) if e.alias == alias]
            if not moves or moves[-1].from_version is None:
                raise NotFoundError(f"{name}@{alias} has no earlier target to roll back to")
            version = self.resolve(Ref(name, version=moves[-1].from_version))
            Index.set_alias(db, name, alias, version.version)
        return version

    # --- maintenance ----------------------------------------------------------------------
    def remove(self, ref: str, force: bool = False) -> Version:
        """Delete a version from the index (its blobs go at the next `gc`)."""
        # Checked and deleted in one transaction: an alias moved onto the version (or a version
        # built on it) in between would otherwise be left pointing at nothing.
        with self._index.transaction() as db:
            version = self.resolve(ref)
            pointing = sorted(a for a, v in self.aliases(version.name).items() if v == version.version)
            dependents = [v.ref for v in self.list() if v.metadata.base == version.ref]
            if not force and (pointing or dependents):
                why = (f"aliases {', '.join(pointing)} point at it" if pointing
                       else f"{', '.join(dependents)} are built on it")
                raise InUseError(f"refusing to remove {version.ref}: {why} (use --force to remove it anyway)")
            db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (version.name, version.version))
            remaining = db.execute("SELECT MAX(version) FROM versions WHERE name = ?", (version.name,)).fetchone()[0]
            for alias in pointing:
                Index.set_alias(db, version.name, alias, remaining if alias == LATEST else None)
        return version

    def gc(self) -> tuple[int, int]:
        """Drop blobs no version references, and what killed writers left (half-written blobs, the
        downloads of pulls and imports); return (files removed, bytes freed)."""
        with self._store_lock(exclusive=True):
            orphans = self.blobs.all_digests() - self._index.referenced_blobs()
            freed = sum(self.blobs.remove(sha) for sha in orphans)
            temporaries = self.blobs.clear_tmp()
            prune_snapshots(self._snapshots, {row.digest for row in self._index.versions()})
            downloads = prune_scratch(self.home)
        return len(orphans) + temporaries[0] + downloads[0], freed + temporaries[1] + downloads[1]

    def verify(self, ref: str | None = None) -> builtins.list[Problem]:
        """Re-hash every file of one version (or of all) and report what does not match."""
        targets = [self.resolve(ref)] if ref else self.list()
        problems = []
        for version in targets:
            for path, sha, _size in self._index.files(version.name, version.version):
                try:
                    self.blobs.verify(sha)
                except CorruptionError as exc:
                    if not self._removed(version):  # else removed and collected meanwhile
                        problems.append(Problem(version.ref, path, str(exc)))
        return problems

    def _removed(self, version: Version) -> bool:
        return self._index.version(version.name, version.version) is None

    def files(self, ref: str | Version) -> builtins.list[tuple[str, str, int]]:
        """(path, sha256, size) of each file of a version."""
        version = self.resolve(ref)
        return self._index.files(version.name, version.version)


def _to_version(row: VersionRow) -> Version:
    metadata = read_stored(row.metadata, row.kind)
    return Version(row.name, row.version, row.kind, row.digest, metadata, datetime.fromisoformat(row.created_at))


def _known_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidMetadata(f"kind {kind!r} is not one of {', '.join(KINDS)}")


def _a(kind: str) -> str:
    return f"an {kind}" if kind == "adapter" else f"a {kind}"
