"""Undo what a crashed process left half done, from its journal.

A job is recovered when the process that ran it is gone (checked at every start of
`virtua serve` and of the CLI without a daemon), or when the client that drives it stops
renewing its lease (checked by serve while it runs). Its started steps are undone newest
first through the undo kinds registered here by the layers that own the work; each undo
must be idempotent and must accept a step that never got going (remove what exists).
A job whose undo needs the manager waits for the next `virtua serve`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from virtua.errors import Busy, Unavailable
from virtua.jobs import runner
from virtua.jobs.record import JobRecord, JobStore, StepRecord

log = logging.getLogger("virtua.jobs")


@dataclass
class Context:
    storage: Any
    manager: Any = None
    # the undone step's time window (StepRecord.began, .ended): an undo takes back only
    # objects made inside it, never one of the same name made before or since
    since: float | None = None
    until: float | None = None

    def made_by_step(self, created: float) -> bool:
        """Whether an object made at `created` (time.time()) can be the step's work."""
        return (self.since is None or created >= self.since) and (self.until is None or created <= self.until)

    def for_step(self, step: StepRecord) -> Context:
        return replace(self, since=step.began, until=step.ended)


class NeedsManager(Exception):
    """This undo runs in `virtua serve` only."""


UndoFn = Callable[..., Any]
UNDO_KINDS: dict[str, UndoFn] = {}


def undo_kind(name: str) -> Callable[[UndoFn], UndoFn]:
    def register(fn: UndoFn) -> UndoFn:
        UNDO_KINDS[name] = fn
        return fn

    return register


def recover(store: JobStore, ctx: Context, *, expired_only: bool = False) -> list[JobRecord]:
    """Recover every running job nobody runs any more; returns them as recovered.
    expired_only: just the client-driven jobs of this process whose client went quiet."""
    out = []
    now = time.time()
    for job in store.running():
        mine = job.id in runner.LIVE
        # a step whose store write's answer was lost: its runner left it to recovery
        stuck = not mine and any(s.state == "unknown" for s in job.steps)
        if expired_only and not stuck:
            if not (mine and job.lease_until is not None and job.lease_until < now):
                continue
            why = f"its client stopped renewing it during step {job.current!r}"
        elif stuck and (expired_only or job.owner.alive()):
            why = f"the answer to a store write of step {job.current!r} was lost"
        else:
            if mine or job.owner.alive():
                continue
            why = f"process {job.owner.pid} stopped during step {job.current!r}"
        gone = job.owner
        if not expired_only or stuck:  # one recoverer per job: another process may be at it right now
            claimed = store.claim(job.id, gone)
            if claimed is None:
                continue
            job = claimed
        try:
            out.append(undo_record(store, job, ctx, why))
        except (NeedsManager, Busy, Unavailable) as e:
            if not expired_only or stuck:  # the claim goes back: the next start of serve or the CLI finds it
                job.owner = gone
                store.put(job)
            if isinstance(e, NeedsManager):
                log.info("job %s (%s) waits for `virtua serve` to be undone", job.id, job.title)
            else:  # e.g. its pool is held by a serve that is starting
                log.warning("job %s (%s) is undone later: %s", job.id, job.title, e.message)
    return out


def _settle(ctx: Context, step: StepRecord) -> bool | None:
    """Whether the lost store write of an unknown step was applied (None: the store cannot
    say, e.g. it was sent by a process gone since, whose claim on the store is gone too, so
    it can never apply now: the step is undone like a started one, which is idempotent)."""
    if ctx.manager is None:
        raise NeedsManager()
    settle = getattr(ctx.manager.store, "settle", None)
    if settle is None or step.txn is None:
        return None
    outcome: bool | None = settle(step.txn, wait=0)  # OutcomeUnknown (Unavailable): later
    return outcome


def undo_record(store: JobStore, job: JobRecord, ctx: Context, why: str) -> JobRecord:
    settled = False
    for step in job.steps:
        if step.state == "unknown":
            outcome = _settle(ctx, step)
            step.state = "done" if outcome else "undone" if outcome is False else "running"
            step.error = None if outcome else step.error
            settled = settled or bool(outcome)
            why = f"{why} (the store says it was {'not ' if not outcome else ''}applied)" if outcome is not None else why
    if settled and all(s.state == "done" for s in job.steps):
        # the lost write was the last step's and it was applied: the job did all it does
        job.state, job.error, job.error_kind = "done", None, None
        job.result = {"settled": f"{why}: what it made is kept"}
        job.ended = time.time()
        store.put(job)
        runner.LIVE.pop(job.id, None)
        log.warning("job %s (%s) %s: what it made is kept", job.id, job.title, why)
        return job
    if job.steps and all(s.state == "done" for s in job.steps):
        # past its last step: what it made is whole (e.g. a VC made, its VMs starting: undoing
        # it would remove the disks under running guests); it is kept, and the job says so
        job.state = "failed"
        job.error = f"interrupted after its last step ({why}): what it made is kept"
        job.error_kind = "Unavailable"
        job.ended = time.time()
        store.put(job)
        runner.LIVE.pop(job.id, None)
        log.warning("job %s (%s) %s", job.id, job.title, job.error)
        return job
    started = [s for s in job.steps if s.state in ("running", "done")]
    failed: list[str] = []
    for step in reversed(started):
        if step.undo is None:  # nothing of it to take back
            step.state = "undone"
            continue
        fn = UNDO_KINDS.get(step.undo.kind)
        try:
            if fn is None:
                raise RuntimeError(f"no undo registered for {step.undo.kind!r}")
            fn(ctx.for_step(step), **step.undo.args)
            step.state, step.error = "undone", None
        except (NeedsManager, Busy, Unavailable):  # not now (etcd away too); a later recovery does the rest
            store.put(job)  # what was undone so far stays undone
            raise
        except Exception as e:  # noqa: BLE001 - record it, undo the rest
            step.state, step.error = "undo-failed", f"{type(e).__name__}: {e}"
            failed.append(f"{step.name}: {step.error}")
        store.put(job)
    job.state = "failed" if failed else "undone"
    job.error = f"interrupted: {why}; " + (
        f"undo failed for {'; '.join(failed)}" if failed else f"undone {len(started)} started step(s)"
    )
    job.error_kind = "Unavailable"
    job.ended = time.time()
    store.put(job)
    runner.LIVE.pop(job.id, None)
    (log.error if failed else log.warning)("job %s (%s) %s", job.id, job.title, job.error)
    return job
