"""Worker threads for the kernel copies of large requests.

A 1 MiB pwrite is 100-300 us in the kernel with the GIL dropped. Done inline it keeps
the event loop from receiving the next payload meanwhile; done here the loop (whose
socket reads run in libuv, also without the GIL) receives on one core while a worker
copies on the other. Small requests stay inline: handing a 4 KiB request to a thread
costs more than the request (5-10x, measured).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol


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
