"""A node's lease in the cluster store, and self-fencing when it cannot be renewed.

The store expires a lease TTL seconds after the last renewal *it* saw. A renewal we sent
at time t (our monotonic clock) reached the store no earlier than t, so the store's
expiry is no earlier than t + TTL. The keeper therefore fences at

    last successful renewal's send time + TTL - margin

which is before the store can expire the lease, whatever the network delays were, and
without comparing two machines' clocks (leases use the store's TTLs, never wall time).
After fencing the node has stopped its guests; the manager restarts them elsewhere only
after the store has expired the lease, so a VM never runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from virtua.cluster.kv import KV, LeaseExpired
from virtua.errors import InvalidArgument, Unavailable

log = logging.getLogger("virtua.lease")

DEFAULT_TTL = 10
Fence = Callable[[str], Awaitable[None] | None]


class NodeLease:
    """Grant a lease, renew it every TTL/4, fence once if the deadline comes first."""

    def __init__(self, kv: KV, node: str, fence: Fence, ttl: int = DEFAULT_TTL, margin: float | None = None) -> None:
        if ttl < 2:
            raise InvalidArgument(f"bad lease TTL {ttl}: at least 2 seconds")
        self.kv = kv
        self.node = node
        self.ttl = ttl
        # Time to kill the guests, plus scheduling slack; never more than half the TTL.
        self.margin = min(margin if margin is not None else max(1.0, ttl * 0.3), ttl / 2)
        self.fence_cb = fence
        self.lease = 0
        self.deadline = 0.0  # monotonic: fence at this moment unless renewed
        self.fenced = asyncio.Event()
        self.fence_reason = ""
        self._task: asyncio.Task[None] | None = None

    @property
    def valid(self) -> bool:
        """True while the store cannot yet have expired our lease."""
        return self.lease != 0 and not self.fenced.is_set() and time.monotonic() < self.deadline

    async def start(self) -> int:
        sent = time.monotonic()
        self.lease = await self.kv.grant(self.ttl)
        self.deadline = sent + self.ttl - self.margin
        self._task = asyncio.create_task(self._run(), name=f"lease-{self.node}")
        log.info("node %s holds lease %x (TTL %d s, fences %.1f s before expiry)",
                 self.node, self.lease, self.ttl, self.margin)
        return self.lease

    async def _run(self) -> None:
        interval = max(0.2, self.ttl / 4)
        retry = 0.25  # after a failed renewal: try again soon, not a whole interval later
        failed = False
        while not self.fenced.is_set():
            now = time.monotonic()
            wait = min(retry if failed else interval, self.deadline - now)
            if wait > 0:
                await asyncio.sleep(wait)
            if time.monotonic() >= self.deadline:
                await self._fence(f"no lease renewal for {self.ttl - self.margin:.1f} s")
                return
            sent = time.monotonic()
            try:
                # Short attempts: one stuck on a member that lost its leader must not use up
                # the time left, and none may outlive the deadline (its answer is too late).
                attempt = max(0.1, min(self.ttl / 4, self.deadline - sent))
                await asyncio.wait_for(self.kv.keepalive(self.lease), attempt)
            except LeaseExpired:
                await self._fence("the store says the lease has expired")
                return
            except (Unavailable, TimeoutError, OSError) as e:
                failed = True
                log.warning("node %s: lease renewal failed (%s); fencing in %.1f s unless it recovers",
                            self.node, str(e) or "timed out", max(0.0, self.deadline - time.monotonic()))
                continue
            failed = False
            self.deadline = sent + self.ttl - self.margin

    async def _fence(self, reason: str) -> None:
        self.fence_reason = reason
        log.error("node %s FENCING: %s; stopping its guests before lease %x can expire",
                  self.node, reason, self.lease)
        self.fenced.set()
        result = self.fence_cb(reason)
        if result is not None:
            await result

    async def close(self, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if revoke and self.lease and not self.fenced.is_set():
            with contextlib.suppress(Unavailable):
                await self.kv.revoke(self.lease)
        self.lease = 0
