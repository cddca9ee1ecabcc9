"""Worker threads for the kernel copies of large requests.

A 1 MiB pwrite, or a 1 MiB writev from the page cache into a socket, is 100-300 us in
the kernel with the GIL dropped. Done inline it keeps the event loop from serving
anything else meanwhile; done here the loop (whose socket reads run in libuv, also
without the GIL) receives and parses on one core while a worker copies on the other. Small requests stay inline: handing a 4 KiB request to a thread
costs more than the request (5-10x, measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from virtua.storage.device import pread_padded


class Job(Protocol):
    def execute(self) -> None:
        """Run in a worker thread; keeps its own error."""
        ...


class BulkWorkers:
    """A few threads that execute() jobs and report each back on the loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int = 2) -> None:
        self.loop = loop
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nbd-bulk")

    def submit(self, job: Job, done: Callable[[], None]) -> None:
        """execute() job in a worker, then call done() on the loop's thread."""
        self._pool.submit(self._run, job, done)

    def _run(self, job: Job, done: Callable[[], None]) -> None:
        job.execute()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self.loop.call_soon_threadsafe(done)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


# How long a worker waits for room in the socket before it copies the rest of a reply
# out of the file and hands it to the loop's transport: bounded, so that a client that
# does not read ties up no worker, and a freed chunk waits for its recycling no longer.
SEND_WAIT = 0.05


class SendJob:
    """A large read reply sent by a worker: its header and a view of the file's bytes in
    one writev(2) (the kernel copies page cache -> socket), waiting for room in the socket
    up to SEND_WAIT. What did not go out by then is read from the file into `rest` for
    the loop to queue; `error` is set instead if the file could not supply the data."""

    __slots__ = ("sock_fd", "hdr", "view", "fd", "pos", "sent", "rest", "error", "done", "ended", "_owner")

    def __init__(self, sock_fd: int, hdr: bytes, view: memoryview, fd: int, pos: int) -> None:
        self.sock_fd = sock_fd  # a duplicate the connection keeps open until end()
        self.hdr = hdr
        self.view = view
        self.fd = fd
        self.pos = pos
        self.sent = 0  # bytes of header and data that went out
        self.rest: bytes | None = None
        self.error: OSError | None = None
        self.done = threading.Event()
        self.ended = False
        self._owner: Any = None

    def execute(self) -> None:
        hl, total = len(self.hdr), len(self.hdr) + len(self.view)
        deadline = time.monotonic() + SEND_WAIT
        poller: select.poll | None = None
        try:
            while self.sent < total:
                s = self.sent
                try:
                    iov: list[bytes | memoryview] = [self.hdr[s:], self.view] if s < hl else [self.view[s - hl :]]
                    n = os.writev(self.sock_fd, iov)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as e:  # EFAULT: a page the file cannot supply; EPIPE: gone
                    if e.errno == errno.EFAULT:
                        break
                    self.error = e
                    return
                if n > 0:
                    self.sent += n
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if poller is None:
                    poller = select.poll()
                    poller.register(self.sock_fd, select.POLLOUT)
                if not poller.poll(left * 1000):
                    break
            if self.sent < total and self.sent:
                done = max(self.sent - hl, 0)
                self.rest = pread_padded(self.fd, len(self.view) - done, self.pos + done)
        except OSError as e:
            self.error = e
        finally:
            self.view = memoryview(b"")  # the mapping may go once nothing refers to it
            self.done.set()

    def end(self) -> None:
        """On the loop thread, once: the file's bytes are no longer read."""
        if self.ended:
            return
        self.ended = True
        if self._owner is not None:
            self._owner.plans.discard(self)
