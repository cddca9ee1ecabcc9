"""One leader among the nodes, elected through the store (no home-made consensus).

The leader key is written create-only with the candidate's node lease, so it exists
exactly while that lease lives: when the leader dies or fences, the store deletes it and
every other candidate, reading the key, tries to take it. The key's create revision is
the leader's term; a leader's writes compare it (`guard()`), so a deposed leader that has
not noticed yet cannot change anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from virtua.cluster.kv import KV, Compare, Delete, Put
from virtua.cluster.lease import NodeLease
from virtua.errors import Unavailable

log = logging.getLogger("virtua.election")

LEADER_KEY = "/leader"
POLL = 0.5  # seconds between reads of the leader key: takeover within TTL + POLL


class Election:
    def __init__(self, kv: KV, lease: NodeLease, on_change: Callable[[bool], Awaitable[None] | None] | None = None,
                 key: str = LEADER_KEY) -> None:
        self.kv = kv
        self.lease = lease
        self.key = key
        self.on_change = on_change
        self.term = 0  # the leader key's create revision while we lead, else 0
        self.leader: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        return self.term != 0 and self.lease.valid

    def guard(self) -> Compare:
        """A transaction condition that holds only while we are still the leader."""
        return Compare(self.key, self.term if self.is_leader else -1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"election-{self.lease.node}")

    async def _run(self) -> None:
        while not self.lease.fenced.is_set():
            try:
                await self._campaign()
                await self._wait_for_vacancy()
            except Unavailable as e:
                log.warning("election: %s", e)
                await self._set(0, None)
                await asyncio.sleep(0.5)
        await self._set(0, None)

    async def _campaign(self) -> None:
        me = self.lease.node
        r = await self.kv.txn([Compare(self.key, 0)], [Put(self.key, {"node": me}, self.lease.lease)])
        cur = await self.kv.get(self.key)
        if cur is None:
            return  # gone again already: campaign once more
        if cur.value.get("node") == me and cur.lease == self.lease.lease:
            if self.term != cur.create_revision:
                log.info("node %s is the leader (term %d)%s", me, cur.create_revision,
                         "" if r.succeeded else " again")
            await self._set(cur.create_revision, me)
        else:
            await self._set(0, str(cur.value.get("node")))

    async def _wait_for_vacancy(self) -> None:
        """Until the leader key goes, changes hands, or we fence. A read every POLL seconds,
        not a watch: one linearizable get is cheap, and it cannot be cut silently the way
        a watch stream can when the member serving it fails."""
        cur = await self.kv.get(self.key)
        while cur is not None:
            try:
                await asyncio.wait_for(self.lease.fenced.wait(), POLL)
                return
            except TimeoutError:
                pass
            if self.term and not self.lease.valid:
                return
            now = await self.kv.get(self.key)
            if now is None or now.create_revision != cur.create_revision:
                return

    async def _set(self, term: int, leader: str | None) -> None:
        was = self.is_leader
        self.term, self.leader = term, leader
        self.changed.set()
        self.changed = asyncio.Event()
        if self.on_change is not None and was != self.is_leader:
            result = self.on_change(self.is_leader)
            if result is not None:
                await result

    async def resign(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.term:
            with contextlib.suppress(Unavailable):
                await self.kv.txn([Compare(self.key, self.term)], [Delete(self.key)])
        await self._set(0, None)

