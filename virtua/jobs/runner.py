"""A job: one admin operation's plan, journalled step by step (virtua.jobs.record).

The journal is written before each step starts (with the step's undo as data) and after
it ends, so at any instant a crash leaves a record that says what may be half done and
how to take it back. Progress is written at most a few times a second. Cancelling a job
of this process takes effect at its next step or progress report; a job that a client
drives (an import whose data the CLI copies) learns it from its next renewal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any

from virtua.errors import Cancelled, InvalidArgument, OutcomeUnknown, VirtuaError
from virtua.jobs.plan import Plan
from virtua.jobs.record import ENDED, JobRecord, JobStore, Owner, StepRecord, new_job_id

log = logging.getLogger("virtua.jobs")
PROGRESS_EVERY = 0.25  # seconds between progress writes
CANCEL_POLL = 0.1  # seconds between looks at the journal for a cancel from another process
# a client-driven job whose client stops renewing this long is recovered
LEASE = float(os.environ.get("VIRTUA_JOB_LEASE", "15"))

LIVE: dict[str, Job] = {}  # this process's running jobs, by id


class Job:
    def __init__(self, store: JobStore, record: JobRecord) -> None:
        self.store = store
        self.record = record
        self.cancel_requested = False
        self._progress_written = 0.0
        self._cancel_polled = 0.0
        self._step = 0

    @property
    def id(self) -> str:
        return self.record.id

    # -- the runner's journal --------------------------------------------------------

    def begin_step(self, i: int) -> None:
        self.check_cancel()
        self._step = i
        self.record.steps[i].state = "running"
        self.record.steps[i].began = time.time()
        # A step that recovery would undo is on disk before it touches anything. The others,
        # and every step's end, commit without an fsync: a process that dies keeps them (a
        # power cut may lose them, and recovery then undoes the step, done or running, the
        # same way). Each fsync here waits behind the data a big import or flatten is writing
        # back (20-110 ms each on ext4, measured), and serve's loop with it.
        self.store.put(self.record, durable=self.record.steps[i].undo is not None)
        _failpoint(f"{self.record.op}:{i}:begin")

    def end_step(self, i: int) -> None:
        _failpoint(f"{self.record.op}:{i}:end")  # its work is done, its journal says running
        self.record.steps[i].state = "done"
        self.record.steps[i].ended = time.time()
        self.store.put(self.record, durable=False)  # see begin_step

    def undone_step(self, i: int, error: BaseException | None = None) -> None:
        step = self.record.steps[i]
        step.state = "undo-failed" if error else "undone"
        step.error = str(error) if error else None
        self._put_after_the_fact()

    def _put_after_the_fact(self) -> None:
        """Journal what was undone, if the journal can be written: if not (a full disk),
        the record still names every step that may have touched something, and undoing
        them again is harmless (undo kinds are idempotent), so the undo goes on."""
        try:
            self.store.put(self.record)
        except VirtuaError as e:
            log.error("job %s: cannot journal its undo: %s", self.id, e.message)

    def fail(self, i: int, error: BaseException) -> None:
        step = self.record.steps[i]
        if step.state == "running":  # it cleans up after itself (or recovery does)
            step.state = "undone"
            step.error = _message(error)
        self._end("cancelled" if isinstance(error, Cancelled) else "failed", error=error)

    def outcome_unknown(self, i: int, error: OutcomeUnknown) -> None:
        """Step i's store write was sent and its answer lost: the job stays running, with
        nothing undone, no longer this process's to run; recovery (serve's job reaper, or
        the next start of serve) asks the store whether the write was applied, then keeps
        what the job made or undoes all of it."""
        step = self.record.steps[i]
        step.state, step.error, step.txn, step.ended = "unknown", error.message, error.txn, time.time()
        r = self.record
        r.error = (f"step {step.name!r}: {error.message}. Nothing was undone: recovery settles it once the "
                   "cluster store answers (it keeps what the job made if the write was applied, else undoes "
                   f"it all); see `virtua job show {r.id}`")
        r.error_kind = type(error).__name__
        self._put_after_the_fact()
        LIVE.pop(r.id, None)

    def failed_after(self, error: BaseException) -> None:
        """Every step done, then what followed them failed (e.g. starting a created VC)."""
        self._end("failed", error=error)

    def finish(self, result: Any) -> Any:
        _failpoint(f"{self.record.op}:finish")  # every step done (and what follows them), not yet ended
        self.record.result = result
        if self.record.progress.total:
            self.record.progress.done = self.record.progress.total
        self._end("done")
        return result

    def _end(self, state: str, error: BaseException | None = None) -> None:
        r = self.record
        r.state = state  # type: ignore[assignment]
        if error is not None:
            r.error = _message(error)
            r.error_kind = type(error).__name__ if isinstance(error, VirtuaError) else "VirtuaError"
        r.ended = time.time()
        try:
            if state == "done":
                self.store.put(r)  # a result that cannot be journalled is the caller's error
            else:
                self._put_after_the_fact()
        finally:
            LIVE.pop(r.id, None)
        with contextlib.suppress(VirtuaError):
            self.store.prune()

    # -- progress and cancel -----------------------------------------------------------

    def progress(self, done: int, total: int | None = None, unit: str | None = None, cancellable: bool = True) -> None:
        """Record how far the running step is; a cancel takes effect here unless the step
        cannot stop in the middle (then at the next step)."""
        if done:
            _failpoint(f"{self.record.op}:{self._step}:progress")  # in the middle of the step's work
        if cancellable:
            self.check_cancel(every=CANCEL_POLL)
        p = self.record.progress
        p.done = done
        if total is not None:
            p.total = total
        if unit is not None:
            p.unit = unit
        now = time.monotonic()
        if now - self._progress_written >= PROGRESS_EVERY or (p.total and done >= p.total):
            self._progress_written = now
            self.store.put(self.record, durable=False)

    def check_cancel(self, *, every: float = 0.0) -> None:
        """Raise Cancelled if the job is to stop. A cancel in this process sets the flag at
        once; one from another reaches the journal, looked at no more often than every
        seconds (progress reports come per slice of a copy)."""
        now = time.monotonic()
        if not self.cancel_requested and now - self._cancel_polled >= every:
            self._cancel_polled = now
            if self.store.cancel_requested(self.id):
                self.cancel_requested = self.record.cancel_requested = True
        if self.cancel_requested:
            raise Cancelled(f"job {self.id} ({self.record.title}) was cancelled; its finished steps are undone")

    def renew(self) -> None:
        self.record.lease_until = time.time() + LEASE


def start(
    store: JobStore, op: str, args: dict[str, Any], plan: Plan, *, client_driven: bool = False,
    total: int = 0, unit: str = "steps",
) -> Job:
    """Record a new job for plan (every step pending) and return it, registered as live."""
    now = time.time()
    record = JobRecord(
        id=new_job_id(), op=op, args=args, title=plan.title, owner=Owner.me(),
        steps=[StepRecord(name=s.name, undo=s.record) for s in plan.steps],
        created=now, updated=now, lease_until=now + LEASE if client_driven else None,
    )
    record.progress.total, record.progress.unit = total, unit
    job = Job(store, record)
    store.put(record)
    LIVE[record.id] = job
    return job


def live(job_id: str) -> Job:
    job = LIVE.get(job_id)
    if job is None:
        raise InvalidArgument(f"job {job_id} is not running here")
    return job


def cancel(store: JobStore, job_id: str) -> JobRecord:
    """Ask a running job to stop; its finished steps are undone (by its runner, or by
    recovery if its process is gone)."""
    record = store.get(job_id)
    if record.state in ENDED:
        raise InvalidArgument(f"job {job_id} has ended ({record.state}): nothing to cancel")
    store.request_cancel(job_id)
    job = LIVE.get(job_id)
    if job is not None:
        job.cancel_requested = True
    record.cancel_requested = True
    return record


def _failpoint(where: str) -> None:
    """Crash tests: VIRTUA_JOB_CRASH=OP:STEP:begin|end|progress (or OP:finish) kills this
    process there (SIGKILL, no clean-up): at a step boundary, at the step's first progress
    report after some of its work is done, or after the last step, so recovery is tested
    against real kills."""
    if os.environ.get("VIRTUA_JOB_CRASH") == where:
        os.kill(os.getpid(), signal.SIGKILL)


def _message(e: BaseException) -> str:
    return e.message if isinstance(e, VirtuaError) else f"{type(e).__name__}: {e}"
