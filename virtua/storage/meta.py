"""The pool's metadata store: SQLite in WAL mode.

Why SQLite: it is transactional and crash-safe (a commit survives kill -9 and, with
synchronous=FULL, power loss), embedded, in the standard library, and inspectable with
the sqlite3 shell. The metadata is small (layers, volumes, snapshots, one row per
allocated chunk) and it changes in batches at flush time, which WAL commits cheaply.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtua.errors import NoSpace

if TYPE_CHECKING:
    from virtua.storage.reserve import SpaceGuard

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- A layer is the set of chunks written between two snapshots of one volume. Layers form
-- a tree through parent; a volume's content is its top layer over its ancestors.
CREATE TABLE IF NOT EXISTS layers (
    id INTEGER PRIMARY KEY,
    parent INTEGER REFERENCES layers(id),
    volume INTEGER NOT NULL            -- the volume that wrote it (not a foreign key: it may be gone)
);
CREATE TABLE IF NOT EXISTS volumes (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    layer INTEGER NOT NULL REFERENCES layers(id),  -- the writable top layer
    origin INTEGER REFERENCES snapshots(id),       -- the snapshot it was cloned from
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY,
    volume INTEGER NOT NULL REFERENCES volumes(id),
    name TEXT NOT NULL,
    layer INTEGER NOT NULL REFERENCES layers(id),  -- frozen: never written again
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    UNIQUE (volume, name)
);
-- One row per chunk a layer maps: phys > 0 is a chunk of the data file, phys = -1 marks
-- a chunk zeroed in this layer (it hides the ancestors' data).
CREATE TABLE IF NOT EXISTS extents (
    layer INTEGER NOT NULL,
    chunk INTEGER NOT NULL,
    phys INTEGER NOT NULL,
    PRIMARY KEY (layer, chunk)
) WITHOUT ROWID;
"""


class MetaDB(sqlite3.Connection):
    """A pool's connection: a full file system is NoSpace (never an OperationalError),
    and every write transaction first calls before_write (the pool's: wait for a commit
    in flight, give the space guard of virtua.storage.reserve its say)."""

    guard: SpaceGuard | None = None
    label = "pool"
    before_write: Callable[[], None] | None = None  # called before each write transaction

    def _before(self, sql: str) -> None:
        hook = self.before_write
        if hook is not None and not self.in_transaction and sql.lstrip()[:6].upper() in _WRITES:
            hook()

    def _full(self, e: sqlite3.OperationalError) -> NoSpace:
        if self.guard is not None:
            self.guard.release()  # so that a retry finds the reserve's room
        where = f" in {self.guard.dir}" if self.guard is not None else ""
        return NoSpace(f"{self.label} is full: no room for its metadata{where} ({e}); free space and retry")

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        self._before(sql)
        try:
            return super().execute(sql, parameters)
        except sqlite3.OperationalError as e:
            if _is_full(e):
                raise self._full(e) from e
            raise

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        self._before(sql)
        try:
            return super().executemany(sql, parameters)
        except sqlite3.OperationalError as e:
            if _is_full(e):
                raise self._full(e) from e
            raise


_WRITES = ("BEGIN ", "INSERT", "UPDATE", "DELETE", "REPLAC")


def _is_full(e: sqlite3.OperationalError) -> bool:
    return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(e)


def connect(path: Path) -> MetaDB:
    db = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, timeout=30, factory=MetaDB
    )
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(SCHEMA)
    return db


class Tx:
    """`with Tx(db):` one IMMEDIATE transaction, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        elif self.db.in_transaction:  # SQLite may have rolled it back itself (disk full)
            self.db.execute("ROLLBACK")
