"""The registry's index: names, versions, files, aliases and alias history, in SQLite.

Every change is one transaction (`BEGIN IMMEDIATE`), so concurrent publishers get distinct
versions and a process killed mid-way leaves either the whole change or none of it."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import CorruptionError
from .refs import LATEST

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, next_version INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES entries(name), version INTEGER NOT NULL, digest TEXT NOT NULL,
    metadata TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS files (
    name TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, PRIMARY KEY (name, version, path),
    FOREIGN KEY (name, version) REFERENCES versions(name, version) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS files_by_blob ON files(sha256);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, updated_at TEXT NOT NULL,
    PRIMARY KEY (name, alias)
);
CREATE TABLE IF NOT EXISTS alias_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, alias TEXT NOT NULL,
    from_version INTEGER, to_version INTEGER, at TEXT NOT NULL
);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class VersionRow:
    name: str
    version: int
    kind: str
    digest: str
    metadata: str
    created_at: str


@dataclass(frozen=True, slots=True)
class AliasEvent:
    """One alias move: `from_version` None means the alias was created, `to_version` None removed."""

    name: str
    alias: str
    from_version: int | None
    to_version: int | None
    at: str


class Index:
    """Thin typed access to the SQLite file; one connection per `Index` (per process)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        # One connection, one transaction at a time: threads sharing a Registry (a server's request and
        # loader threads) take turns, where a second BEGIN on the connection would fail.
        self._in_use = threading.RLock()
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:  # not an SQLite file (damaged, or something else under that name)
            self._db.close()
            raise CorruptionError(f"{path} is not a readable registry index ({exc}); restore it from a "
                                  "backup, or move it aside to start an empty registry") from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the database lock at once (no upgrade deadlocks)."""
        with self._in_use:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Several reads that see one state of the index: a change another process commits meanwhile
        (an alias moved, then the version it left removed) shows in all of them or in none."""
        with self._in_use:
            if self._db.in_transaction:  # inside this thread's transaction already, whose state they see
                yield
                return
            self._db.execute("BEGIN")
            try:
                yield
            finally:
                if self._db.in_transaction:
                    self._db.execute("COMMIT")

    # --- reads -------------------------------------------------------------------------
    _VERSION_COLUMNS = "v.name, v.version, e.kind, v.digest, v.metadata, v.created_at"

    def version(self, name: str, version: int) -> VersionRow | None:
        row = self._db.execute(
            f"SELECT {self._VERSION_COLUMNS} FROM versions v JOIN entries e USING (name) "
            "WHERE v.name = ? AND v.version = ?",
            (name, version),
        ).fetchone()
        return VersionRow(*row) if row else None

    def versions(self, name: str | None = None) -> list[VersionRow]:
        query = f"SELECT {self._VERSION_COLUMNS} FROM versions v JOIN entries e USING (name)"
        args: tuple = ()
        if name is not None:
            query += " WHERE v.name = ?"
            args = (name,)
        rows = self._db.execute(query + " ORDER BY v.name, v.version", args).fetchall()
        return [VersionRow(*r) for r in rows]

    def entry_kind(self, name: str) -> str | None:
        row = self._db.execute("SELECT kind FROM entries WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM entries ORDER BY name")]

    def alias_target(self, name: str, alias: str) -> int | None:
        row = self._db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
        return row[0] if row else None

    def aliases(self, name: str) -> dict[str, int]:
        rows = self._db.execute("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,))
        return dict(rows.fetchall())

    def alias_events(self, name: str) -> list[AliasEvent]:
        rows = self._db.execute(
            "SELECT name, alias, from_version, to_version, at FROM alias_events WHERE name = ? ORDER BY id", (name,)
        ).fetchall()
        return [AliasEvent(*r) for r in rows]

    def files(self, name: str, version: int) -> list[tuple[str, str, int]]:
        rows = self._db.execute(
            "SELECT path, sha256, size FROM files WHERE name = ? AND version = ? ORDER BY path", (name, version)
        )
        return rows.fetchall()

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT DISTINCT sha256 FROM files")}

    # --- writes (call inside `transaction()`) -------------------------------------------
    @staticmethod
    def insert_version(db: sqlite3.Connection, name: str, kind: str, digest: str, metadata_json: str,
                       created_at: str, files: list[tuple[str, str, int]]) -> int:
        """Add the next version of `name` (the entry is made on its first version) and move `latest` to it."""
        db.execute("INSERT OR IGNORE INTO entries (name, kind) VALUES (?, ?)", (name, kind))
        (number,) = db.execute("SELECT next_version FROM entries WHERE name = ?", (name,)).fetchone()
        db.execute("UPDATE entries SET next_version = ? WHERE name = ?", (number + 1, name))
        db.execute("INSERT INTO versions (name, version, digest, metadata, created_at) VALUES (?, ?, ?, ?, ?)",
                   (name, number, digest, metadata_json, created_at))
        db.executemany("INSERT INTO files (name, version, path, sha256, size) VALUES (?, ?, ?, ?, ?)",
                       [(name, number, path, sha, size) for path, sha, size in files])
        Index.set_alias(db, name, LATEST, number)
        return number

    @staticmethod
    def set_alias(db: sqlite3.Connection, name: str, alias: str, version: int | None) -> None:
        """Point `alias` at `version` (None removes it) and record the move."""
        row = db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
        previous = row[0] if row else None
        if previous == version:
            return
        stamp = now()
        if version is None:
            db.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
        else:
            db.execute(
                "INSERT INTO aliases (name, alias, version, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
                (name, alias, version, stamp),
            )
        db.execute(
            "INSERT INTO alias_events (name, alias, from_version, to_version, at) VALUES (?, ?, ?, ?, ?)",
            (name, alias, previous, version, stamp),
        )
