"""The embedded cluster store: SQLite in one process, with etcd's contract (virtua.cluster.kv).

One `virtua serve` owns the file, so transactions need no more than SQLite's own.
Leases count down on this process's monotonic clock; after a restart every lease gets its
full TTL again (as etcd does after a leader change), so a restart never expires a lease
early. Watchers are served from an in-memory log of recent events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from virtua.cluster.kv import (
    Compare,
    Entry,
    Event,
    LeaseExpired,
    Op,
    Put,
    TxnResult,
    TxnWrites,
    decode,
    encode,
)
from virtua.errors import InvalidArgument

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
"""
EVENT_LOG = 10000  # events kept for watchers that start in the past
REAP_INTERVAL = 0.25


class Compacted(InvalidArgument):
    """A watch asked for a revision older than the retained event log."""


class SQLiteKV(TxnWrites):
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        row = self.db.execute("SELECT v FROM meta WHERE k = 'revision'").fetchone()
        self._rev = int(row[0]) if row else 1
        now = time.monotonic()
        self._deadline: dict[int, float] = {
            lid: now + ttl for lid, ttl in self.db.execute("SELECT id, ttl FROM leases")
        }
        self._ttl: dict[int, int] = dict(self.db.execute("SELECT id, ttl FROM leases").fetchall())
        self._log: deque[Event] = deque(maxlen=EVENT_LOG)
        self._watchers: set[asyncio.Queue[Event | None]] = set()
        self._ids = itertools.count(int(time.time() * 1000) << 8)
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> Entry | None:
        self._expire()
        row = self.db.execute(
            "SELECT key, value, create_rev, mod_rev, lease FROM kv WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else _entry(row)

    async def range(self, prefix: str) -> list[Entry]:
        self._expire()
        rows = self.db.execute(
            "SELECT key, value, create_rev, mod_rev, lease FROM kv "
            "WHERE key >= ? AND substr(key, 1, ?) = ? ORDER BY key",
            (prefix, len(prefix), prefix),
        ).fetchall()
        return [_entry(r) for r in rows]

    async def revision(self) -> int:
        self._expire()
        return self._rev

    # ------------------------------------------------------------------ writes

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        self._expire()
        db = self.db
        events: list[Event] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            ok = all(self._mod_rev(c.key) == c.mod_revision for c in compares)
            ops = success if ok else failure
            for op in ops:
                if isinstance(op, Put) and op.lease and op.lease not in self._deadline:
                    raise LeaseExpired(f"lease {op.lease:x} has expired or was revoked")
            changed = [op for op in ops if isinstance(op, Put) or self._mod_rev(op.key)]
            if changed:
                rev = self._rev + 1
                for op in changed:
                    if isinstance(op, Put):
                        db.execute(
                            "INSERT INTO kv (key, value, create_rev, mod_rev, lease) VALUES (?, ?, ?, ?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                            "mod_rev = excluded.mod_rev, lease = excluded.lease",
                            (op.key, encode(op.value), rev, rev, op.lease),
                        )
                        events.append(Event("put", op.key, op.value, rev))
                    else:
                        db.execute("DELETE FROM kv WHERE key = ?", (op.key,))
                        events.append(Event("delete", op.key, None, rev))
                self._set_rev(rev)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if events:
            self._rev = events[-1].revision
            self._publish(events)
        return TxnResult(ok, self._rev)

    def _mod_rev(self, key: str) -> int:
        row = self.db.execute("SELECT mod_rev FROM kv WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def _set_rev(self, rev: int) -> None:
        self.db.execute(
            "INSERT INTO meta (k, v) VALUES ('revision', ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            (rev,),
        )

    # ------------------------------------------------------------------ leases

    async def grant(self, ttl: int) -> int:
        if ttl < 1:
            raise InvalidArgument(f"bad lease TTL {ttl}: at least 1 second")
        lid = next(self._ids)
        self.db.execute("INSERT INTO leases (id, ttl) VALUES (?, ?)", (lid, ttl))
        self._ttl[lid] = ttl
        self._deadline[lid] = time.monotonic() + ttl
        self._start_reaper()
        return lid

    async def keepalive(self, lease: int) -> int:
        self._expire()
        if lease not in self._deadline:
            raise LeaseExpired(f"lease {lease:x} has expired or was revoked")
        self._deadline[lease] = time.monotonic() + self._ttl[lease]
        return self._ttl[lease]

    async def lease_ttl(self, lease: int) -> int:
        """Seconds left (-1: expired or unknown)."""
        self._expire()
        d = self._deadline.get(lease)
        return -1 if d is None else max(0, int(d - time.monotonic()))

    async def revoke(self, lease: int) -> None:
        self._drop_leases([lease])

    def _expire(self) -> None:
        now = time.monotonic()
        gone = [lid for lid, d in self._deadline.items() if d <= now]
        if gone:
            self._drop_leases(gone)

    def _drop_leases(self, leases: list[int]) -> None:
        db = self.db
        events: list[Event] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            marks = ",".join("?" * len(leases))
            keys = [k for (k,) in db.execute(f"SELECT key FROM kv WHERE lease IN ({marks}) ORDER BY key", leases)]
            if keys:
                rev = self._rev + 1
                db.execute(f"DELETE FROM kv WHERE lease IN ({marks})", leases)
                self._set_rev(rev)
                events = [Event("delete", k, None, rev) for k in keys]
            db.execute(f"DELETE FROM leases WHERE id IN ({marks})", leases)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for lid in leases:
            self._deadline.pop(lid, None)
            self._ttl.pop(lid, None)
        if events:
            self._rev = events[-1].revision
            self._publish(events)

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        # Expiry must reach watchers even when nobody reads the store.
        while self._deadline and not self._closed:
            await asyncio.sleep(REAP_INTERVAL)
            self._expire()

    # ------------------------------------------------------------------ watch

    def _publish(self, events: list[Event]) -> None:
        self._log.extend(events)
        for q in self._watchers:
            for ev in events:
                q.put_nowait(ev)

    async def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[Event]:
        q: asyncio.Queue[Event | None] = asyncio.Queue()
        self._watchers.add(q)
        try:
            if start_revision:
                if self._log and start_revision < self._log[0].revision and start_revision <= self._rev:
                    raise Compacted(f"revision {start_revision} is compacted (oldest kept {self._log[0].revision})")
                for old in list(self._log):
                    if old.revision >= start_revision:
                        q.put_nowait(old)
            while True:
                ev = await q.get()
                if ev is None:
                    return
                if ev.key.startswith(prefix) and ev.revision >= start_revision:
                    yield ev
        finally:
            self._watchers.discard(q)

    async def close(self) -> None:
        self._closed = True
        for q in self._watchers:
            q.put_nowait(None)
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reaper
        self.db.close()


def _entry(row: tuple[str, bytes, int, int, int]) -> Entry:
    key, raw, crev, mrev, lease = row
    return Entry(key, decode(raw), int(crev), int(mrev), int(lease))
