"""One contract, two implementations of the manager's synchronous StateStore: the embedded
SQLiteStore (manager.db) and EtcdStateStore on a real etcd (etcd-server 3.4 on loopback,
one member per module, each test under a key prefix of its own). Where the two differ on
purpose (a concurrent writer: SQLite serializes it, etcd's compare-and-swap refuses the
later transaction) the test says what each does."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import virtua.cluster.store_etcd as store_etcd
from tests.cli_support import free_port
from tests.helpers.etcd import etcd_cluster, put_once_back, solo_etcd
from virtua.cluster.etcd_server import Member
from virtua.cluster.store import SQLiteStore, StateStore, prefix_upper_bound
from virtua.cluster.store_etcd import EtcdStateStore, prefix_end
from virtua.errors import InvalidArgument, NoSpace, StoreConflict, Unavailable

pytestmark = pytest.mark.timeout(120)

Opener = Callable[[], StateStore]


@pytest.fixture(scope="module")
def etcd_url() -> Iterator[str]:
    with solo_etcd() as url:
        yield url


@pytest.fixture(params=["sqlite", "etcd"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def opener(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens another client of one store (the same manager.db, the same etcd prefix)."""
    opened: list[StateStore] = []
    prefix = f"/t{uuid.uuid4().hex[:8]}/"

    def open_() -> StateStore:
        s: StateStore
        if kind == "sqlite":
            s = SQLiteStore(tmp_path / "manager.db")
        else:
            s = EtcdStateStore(request.getfixturevalue("etcd_url"), prefix=prefix)
        opened.append(s)
        return s

    try:
        yield open_
    finally:
        for s in opened:
            s.close()


@pytest.fixture
def store(opener: Opener) -> StateStore:
    return opener()


def test_put_get_delete(store: StateStore) -> None:
    assert store.get("/hosts/a") is None
    store.put("/hosts/a", {"cores": 4, "tags": ["x"], "nested": {"n": None}})
    assert store.get("/hosts/a") == {"cores": 4, "tags": ["x"], "nested": {"n": None}}
    store.put("/hosts/a", {"cores": 8})  # overwrite: the whole document
    assert store.get("/hosts/a") == {"cores": 8}
    store.delete("/hosts/a")
    assert store.get("/hosts/a") is None
    store.delete("/hosts/a")  # deleting what is not there is no error
    assert store.range("/hosts/") == []


def test_prefix_range_edges(store: StateStore) -> None:
    for k in ["/vms/ab/1", "/vms/a/2", "/vms/a/1", "/vms/a", "/vms/b/1", "/vmsx/a/1", "/vms/a/\u00e9"]:
        store.put(k, {"k": k})
    assert [k for k, _ in store.range("/vms/a/")] == ["/vms/a/1", "/vms/a/2", "/vms/a/\u00e9"]
    assert [k for k, _ in store.range("/vms/ab/")] == ["/vms/ab/1"]
    assert [k for k, _ in store.range("/vms/")] == ["/vms/a", "/vms/a/1", "/vms/a/2", "/vms/a/\u00e9",
                                                    "/vms/ab/1", "/vms/b/1"]
    assert [v for _, v in store.range("/vms/b/")] == [{"k": "/vms/b/1"}]
    assert store.range("/vms/c/") == []
    assert len(store.range("/")) == 7


def test_range_returns_every_key_past_one_page(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_etcd, "PAGE", 7)  # etcd: pages of 7 keys; SQLite: one query
    for i in range(30):
        store.put(f"/many/{i:03d}", {"i": i})
    got = store.range("/many/")
    assert [v["i"] for _, v in got] == list(range(30))


def test_unicode_keys_and_values(store: StateStore) -> None:
    keys = ["/u/caf\u00e9", "/u/\u65e5\u672c", "/u/\U0001f600", "/u/\U0001f600/x", "/u/\uffff"]
    for k in keys:
        store.put(k, {"text": "\u00fc\u00f1\u00ef\u00e7\u00f8d\u00e9 \U0001f680 \u2028 \"q\" \\ \u0000", "k": k})
    # above U+FFFF too: a bound like prefix + "\uffff" would drop the emoji keys
    assert [k for k, _ in store.range("/u/")] == sorted(keys)
    assert [k for k, _ in store.range("/u/\U0001f600")] == ["/u/\U0001f600", "/u/\U0001f600/x"]
    assert store.get("/u/\U0001f600") == {"text": "\u00fc\u00f1\u00ef\u00e7\u00f8d\u00e9 \U0001f680 \u2028 \"q\" \\ \u0000",
                                          "k": "/u/\U0001f600"}


def test_a_large_document(store: StateStore) -> None:
    doc = {"blob": "x" * 700_000, "list": list(range(20_000))}  # ~800 kB of JSON
    store.put("/big/doc", doc)
    assert store.get("/big/doc") == doc
    assert store.range("/big/") == [("/big/doc", doc)]


def test_a_document_over_etcds_request_limit_is_a_clear_error(store: StateStore, kind: str) -> None:
    doc = {"blob": "x" * 2_000_000}
    if kind == "sqlite":
        store.put("/big/huge", doc)  # SQLite has no such limit
        assert store.get("/big/huge") == doc
        return
    with pytest.raises(NoSpace, match="max-request-bytes"):
        store.put("/big/huge", doc)
    assert store.get("/big/huge") is None


def test_a_txn_past_etcds_operation_limit_is_a_clear_error(store: StateStore, kind: str) -> None:
    with pytest.raises(InvalidArgument, match="max-txn-ops") if kind == "etcd" else contextlib.nullcontext():
        with store.txn():
            for i in range(200):  # etcd's --max-txn-ops is 128 by default; SQLite has no limit
                store.put(f"/ops/{i:03d}", {"i": i})
    assert len(store.range("/ops/")) == (0 if kind == "etcd" else 200)  # all or nothing


def test_a_vc_of_more_than_127_nodes_fits_the_etcd_virtua_starts(etcd_url: str) -> None:
    """Recording a VC is one put per VM and one for the VC: past 127 nodes that was more
    than etcd's default --max-txn-ops (128), so `vc create --nodes 200` on etcd failed at
    its last step. The members virtua starts (virtua.cluster.etcd_server) allow 2048, and a
    store told so commits such a transaction, and its forget (a range and 201 deletes)."""
    from virtua.cluster.etcd_server import MAX_TXN_OPS

    s = EtcdStateStore(etcd_url, prefix=f"/t{uuid.uuid4().hex[:8]}/", max_txn_ops=MAX_TXN_OPS)
    try:
        with s.txn():
            s.put("/vcs/big", {"nodes": 200})
            for i in range(1, 201):
                s.put(f"/vms/big/big-{i}", {"i": i})
        assert len(s.range("/vms/big/")) == 200
        with s.txn():
            for key, _ in s.range("/vms/big/"):
                s.delete(key)
            s.delete("/vcs/big")
        assert s.range("/vms/big/") == [] and s.get("/vcs/big") is None
    finally:
        s.close()


def test_an_exception_inside_a_txn_commits_nothing(opener: Opener) -> None:
    s = opener()
    s.put("/vcs/a", {"v": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with s.txn():
            s.put("/vcs/a", {"v": 2})
            s.put("/vcs/b", {"v": 2})
            s.delete("/vcs/a")
            raise RuntimeError("boom")
    for view in (s, opener()):
        assert view.get("/vcs/a") == {"v": 1}
        assert view.get("/vcs/b") is None
    with s.txn():  # the store still works, and a txn commits all of its writes
        s.put("/vcs/b", {"v": 3})
        s.delete("/vcs/a")
    assert opener().range("/vcs/") == [("/vcs/b", {"v": 3})]


def test_reads_inside_a_txn_see_its_writes_and_others_see_them_at_commit(opener: Opener) -> None:
    s, other = opener(), opener()
    s.put("/vms/v/1", {"n": 1})
    s.put("/vms/v/2", {"n": 2})
    with s.txn():
        s.put("/vms/v/3", {"n": 3})
        s.delete("/vms/v/1")
        s.put("/vms/v/2", {"n": 20})
        assert s.get("/vms/v/3") == {"n": 3}
        assert s.get("/vms/v/1") is None
        assert s.range("/vms/v/") == [("/vms/v/2", {"n": 20}), ("/vms/v/3", {"n": 3})]
        # not yet for another client
        assert other.range("/vms/v/") == [("/vms/v/1", {"n": 1}), ("/vms/v/2", {"n": 2})]
    assert other.range("/vms/v/") == [("/vms/v/2", {"n": 20}), ("/vms/v/3", {"n": 3})]


def test_a_document_read_is_the_callers_copy(store: StateStore) -> None:
    with store.txn():
        store.put("/m/a", {"list": [1]})
        store.get("/m/a")["list"].append(2)  # type: ignore[index]
        store.range("/m/")[0][1]["list"].append(3)
    assert store.get("/m/a") == {"list": [1]}


def test_the_manager_keeps_its_hosts_in_either_store(store: StateStore, tmp_path: Path) -> None:
    from virtua.cluster.manager import Manager
    from virtua.storage.service import Storage

    storage = Storage(tmp_path / "home")
    try:
        m = Manager(tmp_path, storage, store)
        m.add_host("h1", "10.0.0.11:8781", cores=4, memory="8G")
        m.register_host({"name": "h2", "address": "10.0.0.12:8781", "cores": 2, "memory_mb": 2048})
        assert [h.name for h in m.hosts()] == ["h1", "h2"]
        assert m.host("h1").cores == 4 and store.get("/hosts/h2")["memory_mb"] == 2048  # type: ignore[index]
        m.remove_host("h1")
        assert [h.name for h in m.hosts()] == ["h2"]
    finally:
        storage.close()


def test_a_nested_txn_joins_the_outer_one(opener: Opener) -> None:
    s, other = opener(), opener()
    with s.txn():
        s.put("/n/a", {"v": 1})
        with s.txn():
            s.put("/n/b", {"v": 1})
        assert other.get("/n/b") is None  # the inner one committed nothing by itself
        assert s.get("/n/b") == {"v": 1}
    assert other.range("/n/") == [("/n/a", {"v": 1}), ("/n/b", {"v": 1})]
    with pytest.raises(ValueError):  # an inner failure that escapes undoes the outer txn too
        with s.txn():
            s.put("/n/c", {"v": 1})
            with s.txn():
                s.put("/n/d", {"v": 1})
                raise ValueError("inner")
    assert other.range("/n/") == [("/n/a", {"v": 1}), ("/n/b", {"v": 1})]
    s.put("/n/e", {"v": 1})  # and the depth is back to 0: a plain put is at once visible
    assert other.get("/n/e") == {"v": 1}


def test_a_conflicting_concurrent_write(opener: Opener, kind: str) -> None:
    """A reads k in a txn, B writes k, then A writes k: etcd refuses A's commit (B's value
    stays); SQLite's txn holds the write lock from its start, so B waits until A commits
    and then writes over it: no lost update either way."""
    a, b = opener(), opener()
    a.put("/c/k", {"n": 0})
    if kind == "etcd":
        with pytest.raises(StoreConflict, match="/c/k"):
            with a.txn():
                n = a.get("/c/k")
                assert n == {"n": 0}
                b.put("/c/k", {"n": 100})
                a.put("/c/k", {"n": n["n"] + 1})
                a.put("/c/other", {"n": 1})
        assert b.get("/c/k") == {"n": 100}
        assert b.get("/c/other") is None  # nothing of the refused txn
        return
    done = threading.Event()

    def writer() -> None:
        b.put("/c/k", {"n": 100})
        done.set()

    with a.txn():
        n = a.get("/c/k")
        assert n == {"n": 0}
        t = threading.Thread(target=writer)
        t.start()
        assert not done.wait(0.5), "SQLite let B write inside A's transaction"
        a.put("/c/k", {"n": n["n"] + 1})
    t.join(10)
    assert done.is_set()
    assert b.get("/c/k") == {"n": 100}  # B came after A's commit


@pytest.mark.parametrize("kind", ["etcd"])  # SQLite serializes writers: test_a_conflicting_concurrent_write
def test_etcd_txn_conflicts_on_ranges_and_deletes(opener: Opener, kind: str) -> None:
    a, b = opener(), opener()
    a.put("/vms/x/1", {"n": 1})
    cases: list[Callable[[], Any]] = [
        lambda: b.put("/vms/x/2", {"n": 2}),  # a new key under a prefix A ranged over
        lambda: b.delete("/vms/x/1"),  # a key A saw is gone
        lambda: b.put("/vms/x/1", {"n": 9}),  # a key A saw changed
    ]
    for change in cases:
        before = b.range("/")
        with pytest.raises(StoreConflict):
            with a.txn():
                a.range("/vms/x/")
                change()
                a.put("/vcs/x", {"vms": "counted"})
        assert b.get("/vcs/x") is None
        assert b.range("/") != before  # B's write stands
        b.put("/vms/x/1", {"n": 1})
    # a key that stayed absent, and writes not read before (blind), do not conflict
    with a.txn():
        assert a.get("/absent") is None
        b.put("/unrelated", {"n": 1})
        a.put("/vcs/x", {"ok": True})
    assert b.get("/vcs/x") == {"ok": True}
    with pytest.raises(StoreConflict):  # but a key read absent that appears meanwhile does
        with a.txn():
            assert a.get("/appears") is None
            b.put("/appears", {"n": 1})
            a.put("/vcs/x", {"ok": False})
    assert b.get("/vcs/x") == {"ok": True}


def test_close_keeps_what_was_written(opener: Opener) -> None:
    s = opener()
    s.put("/hosts/h", {"n": 1})
    s.close()
    s.close()  # twice is fine
    with pytest.raises(Exception):  # noqa: B017 - a closed store refuses (sqlite3 or httpx says so)
        s.get("/hosts/h")
    assert opener().get("/hosts/h") == {"n": 1}


def test_etcd_keys_live_under_the_prefix_as_json(etcd_url: str) -> None:
    p = f"/pfx{uuid.uuid4().hex[:6]}"
    s, sibling = EtcdStateStore(etcd_url, prefix=p + "/"), EtcdStateStore(etcd_url, prefix=p + "x/")
    try:
        s.put("/hosts/h1", {"cores": 2})
        sibling.put("/hosts/h2", {"cores": 3})
        assert s.range("/") == [("/hosts/h1", {"cores": 2})]  # not the sibling prefix's keys
        r = httpx.post(f"{etcd_url}/v3/kv/range", json={"key": base64.b64encode(f"{p}/hosts/h1".encode()).decode()})
        (kv,) = r.json()["kvs"]
        assert json.loads(base64.b64decode(kv["value"])) == {"cores": 2}
    finally:
        s.close()
        sibling.close()


def test_etcd_unreachable_is_unavailable_and_the_next_endpoint_is_tried(etcd_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    t = time.monotonic()
    with pytest.raises(Unavailable, match=f"etcd at {dead} unreachable") as e:
        EtcdStateStore(dead)
    assert time.monotonic() - t < 3
    assert "\n" not in e.value.message
    s = EtcdStateStore(f"{dead},{etcd_url}", prefix=f"/t{uuid.uuid4().hex[:8]}/")
    try:
        s.put("/a", {"n": 1})
        assert s.get("/a") == {"n": 1}
    finally:
        s.close()


def test_prefix_bounds() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"") == b"\0"
    assert prefix_upper_bound("/a/") == "/a0"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("a\ud7ff") == "a\ue000"
    assert prefix_upper_bound("") is None


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[tuple[list[Member], list[int]]]:
    with etcd_cluster(tmp_path, ["127.0.0.1"] * 3) as c:
        yield c


def test_etcd_without_quorum_is_unavailable_within_bounds(
    trio: tuple[list[Member], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    members, pids = trio
    urls = ",".join(m.client_url for m in members)
    s = EtcdStateStore(urls, read_timeout=1.0)
    try:
        s.put("/q", {"n": 1})
        for pid in pids[1:]:  # two of three frozen: the survivor answers nothing it cannot agree on
            os.killpg(pid, signal.SIGSTOP)
        t = time.monotonic()
        with pytest.raises(Unavailable, match="etcd has no quorum") as e:
            s.get("/q")
        assert time.monotonic() - t < 3 * 1.0 + 2  # one bounded try per endpoint
        assert "\n" not in e.value.message
        t = time.monotonic()
        with pytest.raises(Unavailable, match="etcd has no quorum"):  # held down: at once, no new wait
            s.put("/q", {"n": 2})
        assert time.monotonic() - t < 0.1
        monkeypatch.setattr(store_etcd, "HOLD_DOWN", 0.0)
        s._down_until = 0.0
        with pytest.raises(Unavailable, match="no quorum"):  # a write that got no answer says so
            s.put("/q", {"n": 3})
        for pid in pids[1:]:
            os.killpg(pid, signal.SIGCONT)
        put_once_back(s, "/q", {"n": 4})  # the same client recovers once a quorum is back
        assert s.get("/q") == {"n": 4}
        time.sleep(1)  # and it stays so: nothing sent while the quorum was away applies after it
        assert s.get("/q") == {"n": 4}
    finally:
        s.close()


def test_a_sick_etcd_costs_an_event_loop_caller_one_bounded_call(trio: tuple[list[Member], list[int]]) -> None:
    """serve calls its store on the loop its guests' disks and heartbeats share. With two of
    three members frozen, every probe of the cluster used to hold that loop for a read
    timeout per member, again after each HOLD_DOWN: hosts went unanswered past their fence
    deadline and killed their guests. Now the first call is bounded by CALL_BUDGET, every
    later one fails at once, and a thread of the store sees the quorum come back."""
    members, pids = trio
    s = EtcdStateStore(",".join(m.client_url for m in members), probe_in_background=True)
    try:
        s.put("/q", {"n": 1})
        for pid in pids[1:]:
            os.killpg(pid, signal.SIGSTOP)
        took: list[float] = []
        until = time.monotonic() + 3 * store_etcd.HOLD_DOWN + store_etcd.CALL_BUDGET
        while time.monotonic() < until:
            t = time.monotonic()
            with pytest.raises(Unavailable, match="no quorum"):
                s.get("/q") if len(took) % 2 else s.put("/q", {"n": 2})
            took.append(time.monotonic() - t)
            time.sleep(0.05)
        assert took[0] < store_etcd.CALL_BUDGET + 0.5, took[0]
        slow = [round(d, 3) for d in took[1:] if d > 0.05]
        assert not slow, f"calls after the first waited on the frozen cluster: {slow}"
        for pid in pids[1:]:
            os.killpg(pid, signal.SIGCONT)
        put_once_back(s, "/q", {"n": 3}, every=0.1)  # the background probe lets calls through again
        assert s.get("/q") == {"n": 3}
    finally:
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGCONT)
        s.close()


@pytest.mark.parametrize("noticed_by", ["keep_claim", "a write"])
def test_a_claim_gone_with_its_lease_is_taken_again_unless_another_serve_has_it(
    etcd_url: str, noticed_by: str
) -> None:
    """etcd away longer than the claim's TTL: its lease runs out (here: revoked, as etcd
    does then). The serve that held it takes it again, found by its renewal or by its next
    write (which used to stop serve, and every guest's disk with it); if another serve has
    claimed the prefix meanwhile, it writes nothing and says who has it."""
    from virtua.errors import Busy

    prefix = f"/t{uuid.uuid4().hex[:8]}/"
    first, second = EtcdStateStore(etcd_url, prefix=prefix), EtcdStateStore(etcd_url, prefix=prefix)

    def notice() -> None:
        first.keep_claim() if noticed_by == "keep_claim" else first.put("/hosts/a", {"by": "first, later"})

    try:
        first.claim({"pid": 1}, ttl=30)
        first.put("/hosts/a", {"by": "first"})
        before = second._get_raw("/.claim")
        first._call("lease/revoke", {"ID": first._claim_lease}, idempotent=True)
        assert second.get("/.claim") is None
        notice()
        after = second._get_raw("/.claim")
        assert after[0] == before[0] == {"pid": 1} and after[1] > before[1], "the same serve's claim, made again"
        first.put("/hosts/a", {"by": "first, again"})
        assert second.get("/hosts/a") == {"by": "first, again"}

        first._call("lease/revoke", {"ID": first._claim_lease}, idempotent=True)
        second.claim({"pid": 2}, ttl=30)  # meanwhile another serve took the prefix
        with pytest.raises(Busy, match="another virtua serve .*pid 2"):
            notice()
        with pytest.raises(Busy, match="no longer manages"):
            first.put("/hosts/a", {"by": "first, stale"})
        assert second.get("/hosts/a") == {"by": "first, again"}
    finally:
        second.release_claim()
        first.close()
        second.close()


def test_a_serve_whose_claim_was_taken_writes_nothing(etcd_url: str) -> None:
    """A serve stalled (SIGSTOP, a long GC pause, a frozen VM) past its claim's lease: a
    second serve claims the prefix meanwhile. When the first resumes, its writes must not
    land (two managers writing one cluster's state) until it has noticed and stopped; they
    did, until its next renewal. Every write is now conditional on the claim it holds."""
    from virtua.errors import Busy

    prefix = f"/t{uuid.uuid4().hex[:8]}/"
    first, second = EtcdStateStore(etcd_url, prefix=prefix), EtcdStateStore(etcd_url, prefix=prefix)
    try:
        first.claim({"pid": 1}, ttl=2)
        first.put("/hosts/a", {"by": "first"})  # control: while it holds the claim
        deadline = time.monotonic() + 15
        while True:  # first does not renew: its lease runs out in etcd, and second takes over
            try:
                second.claim({"pid": 2}, ttl=30)
                break
            except Busy:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        with pytest.raises(Busy, match="another virtua serve"):
            first.put("/hosts/a", {"by": "first, stale"})
        with pytest.raises(Busy):
            first.delete("/hosts/a")
        with pytest.raises(Busy):
            with first.txn():
                first.put("/vcs/x", {"by": "first, stale"})
        assert second.get("/hosts/a") == {"by": "first"} and second.get("/vcs/x") is None
        second.put("/hosts/a", {"by": "second"})  # the holder writes
        assert first.get("/hosts/a") == {"by": "second"}
    finally:
        second.release_claim()
        first.close()
        second.close()
