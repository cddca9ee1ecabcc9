"""Node leases, self-fencing and leader election on both stores, and against a real etcd
cluster whose member the node talks to is frozen (SIGSTOP): the node must fence before
the surviving members expire its lease, and another node takes over the leadership."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.helpers.etcd import etcd_cluster
from virtua.cluster.election import Election
from virtua.cluster.etcd_server import Member
from virtua.cluster.kv import KV, Put
from virtua.cluster.kv_etcd import EtcdKV
from virtua.cluster.kv_sqlite import SQLiteKV
from virtua.cluster.lease import NodeLease

# gRPC (under aetcd) binds to the first event loop it sees: one loop for every test here.
pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]



@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[Member], list[int]]]:
    """Three real etcd members on 127.0.0.21-23; yields them and their pids."""
    with etcd_cluster(tmp_path, [f"127.0.0.{20 + i}" for i in (1, 2, 3)]) as c:
        yield c


@pytest_asyncio.fixture(params=["sqlite", "etcd"], loop_scope="session")
async def kv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KV]:
    store: KV
    if request.param == "sqlite":
        store = SQLiteKV(tmp_path / "state.db")
    else:
        members, _ = request.getfixturevalue("cluster")
        store = EtcdKV(",".join(m.client_url for m in members))
    try:
        yield store
    finally:
        await store.close()


async def test_a_renewed_lease_outlives_its_ttl_and_close_revokes_it(kv: KV) -> None:
    fenced: list[str] = []
    n = NodeLease(kv, "h1", fence=fenced.append, ttl=2)
    await n.start()
    await kv.put("/nodes/h1", {"alive": True}, lease=n.lease)
    await asyncio.sleep(4.5)  # two TTLs
    assert not fenced and n.valid
    assert await kv.get("/nodes/h1") is not None
    await n.close()
    assert await kv.get("/nodes/h1") is None


async def test_one_leader_and_a_new_one_when_it_goes(kv: KV) -> None:
    leases = [NodeLease(kv, f"h{i}", fence=lambda r: None, ttl=2) for i in (1, 2, 3)]
    for n in leases:
        await n.start()
    elections = [Election(kv, n) for n in leases]
    for e in elections:
        e.start()
    deadline = time.monotonic() + 10
    while sum(e.is_leader for e in elections) != 1:
        assert time.monotonic() < deadline, "no single leader"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    assert sum(e.is_leader for e in elections) == 1  # and it stays one
    first = next(e for e in elections if e.is_leader)
    guard = first.guard()
    assert (await kv.txn([guard], [Put("/loops/tick", {"by": first.lease.node})])).succeeded
    t0 = time.monotonic()
    await first.resign()
    await first.lease.close()  # the leader dies: its lease goes with it
    while not any(e.is_leader for e in elections if e is not first):
        assert time.monotonic() - t0 < 5, "no takeover within 5 s"
        await asyncio.sleep(0.05)
    second = next(e for e in elections if e.is_leader)
    assert second is not first and second.term > guard.mod_revision
    # the deposed leader's guarded write is refused
    assert not (await kv.txn([guard], [Put("/loops/tick", {"by": "old leader"})])).succeeded
    tick = await kv.get("/loops/tick")
    assert tick is not None and tick.value == {"by": first.lease.node}
    for e in elections:
        await e.resign()
    for n in leases:
        await n.close()


async def test_a_node_cut_off_from_etcd_fences_before_its_lease_expires(
    cluster: tuple[list[Member], list[int]],
) -> None:
    members, pids = cluster
    # The node talks only to m1; the observer (the other nodes) to m2 and m3.
    node_kv = EtcdKV(members[0].client_url, timeout=1.0)
    observer = EtcdKV(",".join(m.client_url for m in members[1:]))
    fenced_at: list[float] = []
    try:
        node = NodeLease(node_kv, "h1", fence=lambda r: fenced_at.append(time.monotonic()), ttl=5)
        await node.start()
        await node_kv.put("/nodes/h1", {"alive": True}, lease=node.lease)
        # long enough to ride out the raft election that freezing m1 may cause
        other = NodeLease(observer, "h2", fence=lambda r: None, ttl=6)
        await other.start()
        e_node, e_other = Election(node_kv, node), Election(observer, other)
        e_node.start()
        await asyncio.sleep(0.5)
        e_other.start()
        await asyncio.sleep(1.0)
        assert e_node.is_leader and not e_other.is_leader
        # m1 freezes: the node can no longer renew; m2 and m3 keep a quorum and the leader's clock
        os.killpg(pids[0], signal.SIGSTOP)
        t_cut = time.monotonic()
        while await observer.get("/nodes/h1") is not None:
            assert time.monotonic() - t_cut < 20, "the lease never expired"
            await asyncio.sleep(0.05)
        t_expired = time.monotonic()
        assert fenced_at, "the node never fenced"
        assert fenced_at[0] < t_expired, "the node fenced after the store expired its lease"
        print(f"cut at 0, fenced at {fenced_at[0] - t_cut:.2f} s, lease expired at {t_expired - t_cut:.2f} s")
        assert not node.valid and not e_node.is_leader
        deadline = time.monotonic() + 10
        while not e_other.is_leader:
            assert time.monotonic() < deadline, f"h2 did not take over: fenced={other.fence_reason!r} leader={e_other.leader} term={e_other.term}"
            await asyncio.sleep(0.05)
        await e_other.resign()
        await other.close()
        await node.close(revoke=False)
    finally:
        os.killpg(pids[0], signal.SIGCONT)
        await node_kv.close()
        await observer.close()
