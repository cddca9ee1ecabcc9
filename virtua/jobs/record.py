"""The job journal: one row per job in $VIRTUA_HOME/jobs.db (SQLite, synchronous=FULL:
a step is on disk before its work begins, so a crash can always be undone from here)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from virtua.errors import NoSpace, NotFound, VirtuaError
from virtua.procs import start_ticks

JobState = Literal["running", "done", "failed", "cancelled", "undone"]
# unknown: the step's last store write was sent and its answer lost (OutcomeUnknown):
# nothing is undone until recovery learns from the store whether it was applied
StepState = Literal["pending", "running", "done", "undone", "undo-failed", "unknown"]
ENDED: tuple[str, ...] = ("done", "failed", "cancelled", "undone")
log = logging.getLogger("virtua.jobs")
KEEP_ENDED = 500  # ended jobs kept for `job list`; older ones are dropped


class Undo(BaseModel):
    """How to undo a step after a crash, when its closure is gone: a registered kind and
    its JSON arguments (virtua.jobs.recovery.UNDO_KINDS)."""

    kind: str
    args: dict[str, Any] = Field(default_factory=dict)


class StepRecord(BaseModel):
    name: str
    state: StepState = "pending"
    undo: Undo | None = None
    error: str | None = None
    # when the step began and ended (time.time()): what it made was made between them, so
    # recovery takes back only that, never what has the same name but was made since
    began: float | None = None
    ended: float | None = None
    txn: str | None = None  # unknown: the store's id of the lost write (OutcomeUnknown.txn)


class Progress(BaseModel):
    done: int = 0
    total: int = 0
    unit: str = "steps"


class Owner(BaseModel):
    """The process that drives the job; a job whose owner is gone is recovered."""

    pid: int
    started: int  # the process's start time in clock ticks since boot (/proc/PID/stat)
    boot: str  # this boot's id: a pid from an earlier boot is never alive

    @classmethod
    def me(cls, pid: int | None = None) -> Owner:
        pid = pid or os.getpid()
        return cls(pid=pid, started=start_ticks(pid) or 0, boot=_boot_id())

    def alive(self) -> bool:
        return self.boot == _boot_id() and start_ticks(self.pid) == self.started


class JobRecord(BaseModel):
    id: str
    op: str
    args: dict[str, Any] = Field(default_factory=dict)
    title: str
    state: JobState = "running"
    steps: list[StepRecord] = Field(default_factory=list)
    progress: Progress = Field(default_factory=Progress)
    result: Any = None
    error: str | None = None
    error_kind: str | None = None  # the VirtuaError class name: keeps the error's category
    owner: Owner
    lease_until: float | None = None  # driven by a client: it renews, or the job is recovered
    cancel_requested: bool = False
    created: float
    updated: float
    ended: float | None = None

    @property
    def current(self) -> str | None:
        for s in self.steps:
            if s.state == "running":
                return s.name
        return None

    def public(self) -> dict[str, Any]:
        d = self.model_dump(exclude={"owner"})
        d["step"] = self.current
        return d


def _record(row: tuple[str, int]) -> JobRecord:
    record = JobRecord.model_validate_json(row[0])
    record.cancel_requested = bool(row[1])
    return record


def _records(rows: list[tuple[str, str, int]]) -> list[JobRecord]:
    """The rows' records; a row that does not parse (a damaged journal) is said and skipped,
    so that one bad row does not stop every command."""
    out = []
    for job_id, record, cancel in rows:
        try:
            out.append(_record((record, cancel)))
        except ValidationError as e:
            log.error("job %s: its record in the journal is damaged, skipped (%s)", job_id,
                      e.errors()[0].get("msg", e) if e.errors() else e)
    return out


@contextlib.contextmanager
def _journal_errors(path: Path) -> Iterator[None]:
    """SQLite's errors as the error tree's: a full disk is NoSpace, a damaged file says
    which file and what to do (never a traceback)."""
    try:
        yield
    except sqlite3.OperationalError as e:
        if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(e):
            raise NoSpace(f"the job journal {path} cannot be written: no space left ({e}); free space and retry") from e
        raise VirtuaError(f"the job journal {path}: {e}") from e
    except sqlite3.DatabaseError as e:  # not a database, malformed
        raise VirtuaError(
            f"the job journal {path} is damaged ({e}): move it aside (mv {path} {path}.damaged) and run "
            "`virtua pool check` on each pool; the jobs it recorded are not undone"
        ) from e


_BOOT: str | None = None


def _boot_id() -> str:
    global _BOOT
    if _BOOT is None:
        _BOOT = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return _BOOT


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        with _journal_errors(path):
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.execute(
                    "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, created REAL NOT NULL, "
                    "record TEXT NOT NULL, cancel INTEGER NOT NULL DEFAULT 0)"  # cancel: set by anyone, never by put
                )
            except BaseException:
                self.db.close()
                raise
        os.chmod(path, 0o600)

    def put(self, job: JobRecord, durable: bool = True) -> None:
        """Write the job's record. durable=False (progress reports, lease renewals) commits
        without an fsync: the next durable write makes it durable too, and losing it in a
        power cut loses a percentage, not a step. An fsync here runs on serve's loop and
        can wait 0.2-0.3 s behind a big import's writeback, which a guest's disk then waits."""
        job.updated = time.time()
        with self._lock, _journal_errors(self.path):
            if not durable:
                self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit without an fsync
            try:
                self.db.execute(
                    "INSERT INTO jobs (id, state, created, record) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET state = excluded.state, record = excluded.record",
                    (job.id, job.state, job.created, job.model_dump_json()),
                )
            finally:
                if not durable:
                    self.db.execute("PRAGMA synchronous=FULL")

    def get(self, job_id: str) -> JobRecord:
        with self._lock, _journal_errors(self.path):
            row = self.db.execute("SELECT record, cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} does not exist (`virtua job list --all` shows them)")
        try:
            return _record(row)
        except ValidationError as e:
            raise VirtuaError(f"job {job_id}: its record in {self.path} is damaged ({e.error_count()} error(s))") from e

    def claim(self, job_id: str, owner: Owner) -> JobRecord | None:
        """Make this process the owner of a running job that `owner` ran (to recover it),
        atomically: None if it has ended or another process has claimed it meanwhile."""
        with self._lock, _journal_errors(self.path):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT record, cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
                job = None if row is None else _record(row)
                if job is None or job.state != "running" or job.owner != owner:
                    self.db.execute("ROLLBACK")
                    return None
                job.owner = Owner.me()
                job.updated = time.time()
                self.db.execute("UPDATE jobs SET record = ? WHERE id = ?", (job.model_dump_json(), job_id))
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        return job

    def request_cancel(self, job_id: str) -> None:
        with self._lock, _journal_errors(self.path):
            self.db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock, _journal_errors(self.path):
            row = self.db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def recent(self, *, running_only: bool = False, limit: int = 50) -> list[JobRecord]:
        q = "SELECT id, record, cancel FROM jobs"
        if running_only:
            q += " WHERE state = 'running'"
        q += " ORDER BY created DESC LIMIT ?"
        with self._lock, _journal_errors(self.path):
            rows = self.db.execute(q, (limit,)).fetchall()
        return _records(rows)

    def running(self) -> list[JobRecord]:
        with self._lock, _journal_errors(self.path):
            rows = self.db.execute(
                "SELECT id, record, cancel FROM jobs WHERE state = 'running' ORDER BY created"
            ).fetchall()
        return _records(rows)

    def prune(self) -> None:
        with self._lock, _journal_errors(self.path):
            self.db.execute(
                "DELETE FROM jobs WHERE state != 'running' AND id NOT IN "
                "(SELECT id FROM jobs WHERE state != 'running' ORDER BY created DESC LIMIT ?)", (KEEP_ENDED,)
            )

    def close(self) -> None:
        self.db.close()
