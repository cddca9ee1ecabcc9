"""The pool's metadata store: SQLite in WAL mode.

Why SQLite: it is transactional and crash-safe (a commit survives kill -9 and, with
synchronous=FULL, power loss), embedded, in the standard library, and inspectable with
the sqlite3 shell. The metadata is small (layers, volumes, snapshots, one row per
allocated chunk) and it changes in batches at flush time, which WAL commits cheaply.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

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


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
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
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
