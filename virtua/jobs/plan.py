"""Admin operations as plans: named steps with an undo each, run by one shared runner.

If a step fails, the finished steps are undone in reverse order, so an operation is all
or nothing (VirtuaLinux's five-stage VC creation either completes or leaves no trace).
With a job (virtua.jobs.runner.Job), every step is journalled before it starts, with the
record of its undo (`Undo`), so a crash in the middle can be undone by the next process
(virtua.jobs.recovery) even though the step's closures died with the old one.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from virtua.errors import OutcomeUnknown
from virtua.jobs.record import Undo

if TYPE_CHECKING:
    from virtua.jobs.runner import Job

log = logging.getLogger("virtua.plan")

Action = Callable[[], Any | Awaitable[Any]]


@dataclass
class Step:
    name: str
    do: Action
    undo: Action | None = None
    record: Undo | None = None  # the undo, as data: what recovery runs after a crash


@dataclass
class Plan:
    title: str
    steps: list[Step] = field(default_factory=list)
    done: list[str] = field(default_factory=list)

    def add(self, name: str, do: Action, undo: Action | None = None, record: Undo | None = None) -> None:
        self.steps.append(Step(name, do, undo, record))

    def describe(self) -> list[str]:
        return [s.name for s in self.steps]

    async def run(self, job: Job | None = None) -> None:
        finished: list[Step] = []
        for i, step in enumerate(self.steps):
            try:
                if job is not None:
                    # in a thread: its fsync may wait behind the file system's writeback
                    # (tens of milliseconds beside a big copy), and the loop serves guests
                    await asyncio.get_running_loop().run_in_executor(None, job.begin_step, i)
                await _call(step.do)
                finished.append(step)  # its work is done: from here on, undone with the rest
                if job is not None:
                    job.end_step(i)  # may fail (a full disk): the step is undone all the same
            except OutcomeUnknown as e:
                _keep(self, step, e, i, job)
                raise
            except BaseException as e:
                log.warning("%s: step %r failed (%s); undoing %d step(s)", self.title, step.name, e, len(finished))
                for prev in reversed(finished):
                    await _undo_one(self, prev, job)
                if job is not None:
                    job.fail(i, e)
                raise
            self.done.append(step.name)

    def run_sync(self, job: Job | None = None) -> None:
        """The same, for steps that are all plain functions (the CLI without a daemon)."""
        finished: list[Step] = []
        for i, step in enumerate(self.steps):
            try:
                if job is not None:
                    job.begin_step(i)
                result = step.do()
                assert not inspect.isawaitable(result), f"{step.name}: run_sync needs plain steps"
                finished.append(step)
                if job is not None:
                    job.end_step(i)
            except OutcomeUnknown as e:
                _keep(self, step, e, i, job)
                raise
            except BaseException as e:
                log.warning("%s: step %r failed (%s); undoing %d step(s)", self.title, step.name, e, len(finished))
                for prev in reversed(finished):
                    _undo_one_sync(self, prev, job)
                if job is not None:
                    job.fail(i, e)
                raise
            self.done.append(step.name)


def _keep(plan: Plan, step: Step, e: OutcomeUnknown, i: int, job: Job | None) -> None:
    """A step whose store write may or may not have been applied: undoing the steps before
    it could leave a record of what is gone (a VC without its disks), so nothing is undone;
    the job stays for recovery, which asks the store and then keeps or undoes it all."""
    log.error("%s: step %r: %s; nothing is undone, recovery settles it", plan.title, step.name, e.message)
    if job is not None:
        job.outcome_unknown(i, e)


async def _undo_one(plan: Plan, step: Step, job: Job | None) -> None:
    if step.undo is None:
        return
    try:
        await _call(step.undo)
        if job is not None:
            job.undone_step(plan.steps.index(step))
    except Exception as undo_err:  # keep undoing the rest
        log.error("%s: undo of %r failed: %s", plan.title, step.name, undo_err)
        if job is not None:
            job.undone_step(plan.steps.index(step), undo_err)


def _undo_one_sync(plan: Plan, step: Step, job: Job | None) -> None:
    if step.undo is None:
        return
    try:
        step.undo()
        if job is not None:
            job.undone_step(plan.steps.index(step))
    except Exception as undo_err:
        log.error("%s: undo of %r failed: %s", plan.title, step.name, undo_err)
        if job is not None:
            job.undone_step(plan.steps.index(step), undo_err)


async def _call(fn: Action) -> Any:
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result
