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

import errno
import os
import threading
from collections.abc import Callable

from virtua.errors import InvalidArgument


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


class CopyPlan(WritePlan):
    """A planned write whose bytes come from another file (an image being imported):
    the worker copies them in the kernel (copy_file_range), with no buffer in between."""

    __slots__ = ("src_fd", "src_pos")

    def __init__(self, plan: WritePlan, src_fd: int, src_pos: int) -> None:
        super().__init__(plan.fd, plan.runs, plan.data, plan._finish)
        self.src_fd = src_fd
        self.src_pos = src_pos  # where the write's first byte is in the source file

    def execute(self) -> None:
        try:
            for pos, off, n in self.runs:
                copy_range(self.src_fd, self.src_pos + off, self.fd, pos, n)
        except BaseException as e:  # noqa: BLE001 - handed to the loop thread
            self.error = e
        finally:
            self.done.set()


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


COPY_BUFFER = 4 << 20


def copy_range(src_fd: int, src: int, dst_fd: int, dst: int, length: int) -> None:
    """length bytes from src_fd at src to dst_fd at dst: copy_file_range where the
    kernel can (same or like file systems), else pread/pwrite. A source that ends
    early is the image's error (it was cut while being read: InvalidArgument), never zeros."""
    kernel = True
    while length > 0:
        if kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, length, src, dst)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                kernel = False
                continue
        else:
            data = os.pread(src_fd, min(length, COPY_BUFFER), src)
            n = len(data)
            if n:
                pwrite_full(dst_fd, memoryview(data), dst)
        if n == 0:
            raise InvalidArgument(f"the image file ends at byte {src}, {length} bytes short of what it maps: "
                                  "it was cut while being imported")
        src += n
        dst += n
        length -= n
