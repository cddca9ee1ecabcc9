"""One contract, two stores: every test runs against the embedded SQLite store and a real
etcd (etcd-server 3.4 on loopback). A 3-member etcd cluster on 127.0.0.11-13 checks what
quorum loss looks like to the manager."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.cli_support import free_port
from tests.helpers.etcd import solo_etcd
from virtua.cluster.etcd_server import Member, start_member, wait_healthy
from virtua.cluster.kv import (
    KV,
    Compare,
    Delete,
    LeaseExpired,
    NoQuorum,
    Put,
    delete_if,
    put_if,
)
from virtua.cluster.kv_etcd import EtcdKV, parse_endpoints
from virtua.cluster.kv_sqlite import SQLiteKV
from virtua.errors import InvalidArgument, Unavailable

# gRPC (under aetcd) binds to the first event loop it sees: one loop for every test here.
pytestmark = pytest.mark.asyncio(loop_scope="session")



@pytest.fixture(scope="module")
def etcd_url() -> Iterator[str]:
    with solo_etcd() as url:
        yield url


@pytest_asyncio.fixture(params=["sqlite", "etcd"], loop_scope="session")
async def kv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[KV, str]]:
    """A store and a key prefix of this test's own (the etcd member is shared)."""
    prefix = f"/t{uuid.uuid4().hex[:8]}/"
    store: KV
    if request.param == "sqlite":
        store = SQLiteKV(tmp_path / "state.db")
    else:
        store = EtcdKV(request.getfixturevalue("etcd_url"))
    try:
        yield store, prefix
    finally:
        await store.close()


async def test_put_get_and_revisions(kv: tuple[KV, str]) -> None:
    s, p = kv
    assert await s.get(p + "a") is None
    r1 = await s.put(p + "a", {"n": 1})
    e = await s.get(p + "a")
    assert e is not None and e.value == {"n": 1}
    assert e.create_revision == e.mod_revision == r1
    r2 = await s.put(p + "a", {"n": 2})
    assert r2 > r1
    e2 = await s.get(p + "a")
    assert e2 is not None and e2.value == {"n": 2}
    assert e2.create_revision == r1 and e2.mod_revision == r2
    assert await s.revision() >= r2


async def test_range_is_a_prefix_in_key_order(kv: tuple[KV, str]) -> None:
    s, p = kv
    for k in ("b", "a", "c/x", "c/y"):
        await s.put(p + k, {"k": k})
    await s.put(p[:-1] + "x/a", {"k": "outside"})  # shares the prefix's text but not its "/"
    assert [e.key for e in await s.range(p)] == [p + "a", p + "b", p + "c/x", p + "c/y"]
    assert [e.value["k"] for e in await s.range(p + "c/")] == ["c/x", "c/y"]
    assert await s.range(p + "nothing/") == []


async def test_put_if_is_compare_and_swap(kv: tuple[KV, str]) -> None:
    s, p = kv
    k = p + "vm"
    assert await put_if(s, k, {"owner": "h1"}, 0)  # create only
    assert not await put_if(s, k, {"owner": "h2"}, 0)  # exists already
    e = await s.get(k)
    assert e is not None and e.value == {"owner": "h1"}
    assert await put_if(s, k, {"owner": "h2"}, e.mod_revision)
    assert not await put_if(s, k, {"owner": "h3"}, e.mod_revision)  # stale read
    e2 = await s.get(k)
    assert e2 is not None and e2.value == {"owner": "h2"}
    assert not await delete_if(s, k, e.mod_revision)
    assert await delete_if(s, k, e2.mod_revision)
    assert await s.get(k) is None


async def test_concurrent_read_modify_write_loses_no_update(kv: tuple[KV, str]) -> None:
    s, p = kv
    k = p + "counter"
    await s.put(k, {"n": 0})

    async def bump() -> int:
        tries = 0
        while True:
            tries += 1
            e = await s.get(k)
            assert e is not None
            await asyncio.sleep(0)  # let the others read the same revision
            if await put_if(s, k, {"n": e.value["n"] + 1}, e.mod_revision):
                return tries

    tries = await asyncio.gather(*(bump() for _ in range(20)))
    e = await s.get(k)
    assert e is not None and e.value["n"] == 20
    assert max(tries) > 1  # the race really happened


async def test_txn_applies_all_or_the_failure_branch(kv: tuple[KV, str]) -> None:
    s, p = kv
    await s.put(p + "a", {"v": 1})
    a = await s.get(p + "a")
    assert a is not None
    r = await s.txn([Compare(p + "a", a.mod_revision), Compare(p + "b", 0)],
                    [Put(p + "b", {"v": 2}), Delete(p + "a")], [Put(p + "lost", {"v": 0})])
    assert r.succeeded
    assert await s.get(p + "a") is None
    b = await s.get(p + "b")
    assert b is not None and b.mod_revision == r.revision
    r2 = await s.txn([Compare(p + "b", 0)], [Put(p + "x", {})], [Put(p + "lost", {"v": 1})])
    assert not r2.succeeded
    assert await s.get(p + "x") is None
    lost = await s.get(p + "lost")
    assert lost is not None and lost.value == {"v": 1}


async def test_lease_expiry_deletes_its_keys_and_keepalive_holds_them(kv: tuple[KV, str]) -> None:
    s, p = kv
    short = await s.grant(2)
    held = await s.grant(2)
    await s.put(p + "short", {"x": 1}, lease=short)
    await s.put(p + "held", {"x": 2}, lease=held)
    e = await s.get(p + "held")
    assert e is not None and e.lease == held
    deadline = time.monotonic() + 8
    while await s.get(p + "short") is not None:
        assert time.monotonic() < deadline, "a key outlived its lease"
        await s.keepalive(held)
        await asyncio.sleep(0.3)
    assert await s.get(p + "held") is not None  # kept alive past its TTL
    with pytest.raises(LeaseExpired):
        await s.keepalive(short)
    with pytest.raises(LeaseExpired):
        await s.put(p + "late", {"x": 3}, lease=short)
    assert await s.get(p + "late") is None
    await s.revoke(held)
    assert await s.get(p + "held") is None
    assert await s.lease_ttl(held) == -1


async def test_watch_sees_every_change_in_order(kv: tuple[KV, str]) -> None:
    s, p = kv
    start = await s.put(p + "a", {"v": 0})
    lease = await s.grant(2)
    seen: list[tuple[str, str, int]] = []

    async def watcher() -> None:
        async for ev in s.watch(p, start_revision=start):
            seen.append((ev.kind, ev.key[len(p):], ev.revision))
            if ev.kind == "delete" and ev.key.endswith("leased"):
                return

    task = asyncio.create_task(watcher())
    await asyncio.sleep(0.3)
    await s.put(p + "b", {"v": 1})
    await s.put(p[:-1] + "other", {"v": 9})  # not under the prefix
    await s.delete(p + "a")
    await s.put(p + "leased", {"v": 2}, lease=lease)
    await asyncio.wait_for(task, 10)  # the lease's expiry ends it
    kinds = [(k, key) for k, key, _ in seen]
    assert kinds == [("put", "a"), ("put", "b"), ("delete", "a"), ("put", "leased"), ("delete", "leased")]
    revs = [r for _, _, r in seen]
    assert revs == sorted(revs) and revs[0] == start


async def test_values_are_json_objects(kv: tuple[KV, str]) -> None:
    s, p = kv
    await s.put(p + "doc", {"nested": {"list": [1, 2, "three"]}, "none": None})
    e = await s.get(p + "doc")
    assert e is not None and e.value == {"nested": {"list": [1, 2, "three"]}, "none": None}
    with pytest.raises(InvalidArgument):
        await s.grant(0)


async def test_sqlite_state_and_leases_survive_a_restart(tmp_path: Path) -> None:
    s = SQLiteKV(tmp_path / "state.db")
    lease = await s.grant(30)
    await s.put("/k", {"v": 1})
    await s.put("/l", {"v": 2}, lease=lease)
    rev = await s.revision()
    await s.close()
    s2 = SQLiteKV(tmp_path / "state.db")
    try:
        assert await s2.revision() == rev
        assert (await s2.get("/l")) is not None  # a restart gives the lease its full TTL
        assert await s2.lease_ttl(lease) >= 29
        assert await s2.put("/k", {"v": 3}) == rev + 1
    finally:
        await s2.close()


async def test_endpoints_are_checked() -> None:
    assert parse_endpoints("http://10.0.0.1:2379, https://h2:2380") == [("10.0.0.1", 2379), ("h2", 2380)]
    for bad in ("", "http://nohost", "http://h:port", ","):
        with pytest.raises(InvalidArgument):
            parse_endpoints(bad)


async def test_unreachable_etcd_is_a_clear_error_not_a_hang() -> None:
    s = EtcdKV(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(Unavailable, match="etcd at http://127.0.0.1"):
            await s.get("/x")
    finally:
        await s.close()
    assert time.monotonic() - t0 < 10


async def test_three_members_survive_one_loss_and_refuse_without_quorum(tmp_path: Path) -> None:
    members = [Member(f"m{i}", f"127.0.0.{10 + i}", free_port(f"127.0.0.{10 + i}"),
                      free_port(f"127.0.0.{10 + i}")) for i in (1, 2, 3)]
    token = uuid.uuid4().hex
    procs = [start_member(m, members, tmp_path / m.name, token) for m in members]
    s = EtcdKV(",".join(m.client_url for m in members), timeout=8.0)  # rides out an election
    try:
        for m in members:
            wait_healthy(m.client_url)
        await s.put("/q/a", {"v": 1})
        os.killpg(procs[0].pid, signal.SIGKILL)  # the first endpoint: the client must move on
        procs[0].wait()
        await s.put("/q/b", {"v": 2})
        e = await s.get("/q/a")
        assert e is not None and e.value == {"v": 1}
        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].wait()
        t0 = time.monotonic()
        with pytest.raises(NoQuorum, match="no quorum"):
            await s.put("/q/c", {"v": 3})
        assert time.monotonic() - t0 < 15
    finally:
        await s.close()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
