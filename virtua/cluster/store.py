"""Cluster state as keys and JSON documents: hosts, templates, VCs, VMs.

The interface is the small subset of etcd's model the manager needs (get, put, delete,
prefix range, transactions), so the embedded SQLite store here and the etcd store
(virtua.cluster.store_etcd) are interchangeable; tests/unit/test_state_store_contract.py
runs one contract on both.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from virtua.errors import StoreConflict

__all__ = ["SQLiteStore", "StateStore", "StoreConflict", "prefix_upper_bound"]


class StateStore(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...
    def put(self, key: str, value: dict[str, Any]) -> None: ...
    def delete(self, key: str) -> None: ...
    def range(self, prefix: str) -> list[tuple[str, dict[str, Any]]]: ...
    def txn(self) -> Any: ...  # context manager: all puts/deletes inside commit together
    def close(self) -> None: ...


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with prefix, in code point order
    (SQLite's BINARY collation on UTF-8 and Python's str order); None: no bound. Not
    `prefix + "\\uffff"`: that misses keys with a character beyond U+FFFF after the prefix."""
    chars = list(prefix)
    while chars:
        c = ord(chars.pop())
        if c < 0x10FFFF:
            c += 1
            if 0xD800 <= c <= 0xDFFF:  # surrogates are no characters: skip them
                c = 0xE000
            return "".join(chars) + chr(c)
    return None


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, rev INTEGER NOT NULL)"
        )
        self._lock = threading.RLock()
        self._depth = 0

    def get(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self.txn():
            self.db.execute(
                "INSERT INTO kv (key, value, rev) VALUES (?, ?, 1) ON CONFLICT(key) "
                "DO UPDATE SET value = excluded.value, rev = kv.rev + 1",
                (key, json.dumps(value, sort_keys=True)),
            )

    def delete(self, key: str) -> None:
        with self.txn():
            self.db.execute("DELETE FROM kv WHERE key = ?", (key,))

    def range(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        end = prefix_upper_bound(prefix)
        if end is None:
            rows = self.db.execute("SELECT key, value FROM kv WHERE key >= ? ORDER BY key", (prefix,)).fetchall()
        else:
            rows = self.db.execute(
                "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key", (prefix, end)
            ).fetchall()
        return [(k, json.loads(v)) for k, v in rows]

    @contextmanager
    def txn(self) -> Iterator[None]:
        with self._lock:
            outer = self._depth == 0
            if outer:
                self.db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self.db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()
