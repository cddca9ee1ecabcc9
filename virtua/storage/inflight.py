"""Writes whose data a worker thread copies into the file, while the loop goes on.

The loop thread plans such a write (range checks, chunk allocation, copy-on-write: the
block map has one writer, the loop thread) and a worker thread does the pwrite, which
drops the GIL: the loop meanwhile receives the next payload on the other core. What the
plan changed in the map is recorded (rows for the next commit) only once the data is in
the file, by `end()` on the loop thread: from the request's completion callback, or
earlier from `Pool.flush()`, which waits for every write of its pool first, so an admin
operation (snapshot, clone, delete: each flushes first) never runs beside a write still
on its way, and a FLUSH never commits a row whose data is not written.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


class WritePlan:
    """One write: where its bytes go, and what to do on the loop once they are there."""

    __slots__ = ("fd", "runs", "data", "error", "done", "ended", "_finish", "_owner")

    def __init__(
        self,
        fd: int,
        runs: list[tuple[int, int, int]],
        data: memoryview,
        finish: Callable[[WritePlan], None] | None = None,
    ) -> None:
        self.fd = fd
        self.runs = runs  # (file position, offset in data, length), in order
        self.data = data
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.ended = False
        self._finish = finish
        self._owner: InflightWrites | None = None

    def execute(self) -> None:
        """Write the data (any thread); an error is kept for the loop to answer with."""
        try:
            for pos, off, n in self.runs:
                pwrite_full(self.fd, self.data[off : off + n], pos)
        except BaseException as e:  # noqa: BLE001 - handed to the loop thread
            self.error = e
        finally:
            self.done.set()

    def end(self) -> None:
        """On the loop thread, once, after execute(): record what the write mapped."""
        if self.ended:
            return
        self.ended = True
        if self._owner is not None:
            self._owner.plans.discard(self)
        if self._finish is not None:
            self._finish(self)


class InflightWrites:
    """The planned writes of one pool (or file) whose data may still be on its way."""

    def __init__(self) -> None:
        self.plans: set[WritePlan] = set()

    def add(self, plan: WritePlan) -> WritePlan:
        plan._owner = self
        self.plans.add(plan)
        return plan

    def wait(self) -> None:
        """On the loop thread: let every write in flight finish, and end it."""
        while self.plans:
            plan = next(iter(self.plans))
            plan.done.wait()
            plan.end()


def pwrite_full(fd: int, data: memoryview, pos: int) -> None:
    done = os.pwrite(fd, data, pos)
    while done < len(data):
        done += os.pwrite(fd, data[done:], pos + done)
