"""A transaction whose answer is lost (sent, then a read timeout): on a real etcd
(etcd-server 3.4 on loopback). The transport is made to lose the answer deterministically:
the POST goes to etcd and its answer is thrown away (applied), or it is never sent (not
applied); both look like the read timeout the client sees when a member stalls. The
caller sees success when it was applied, a definite failure when it was not (and a replay
of that very request can no longer apply), OutcomeUnknown when etcd stays away, and a
job (a plan shaped like `vc create`: disks made, then the record written in one
transaction) keeps its disks and its record consistent in every case."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import virtua.cluster.store_etcd as store_etcd
from tests.helpers.etcd import etcd_cluster, put_once_back, solo_etcd
from virtua.cluster.store_etcd import EtcdStateStore
from virtua.errors import OutcomeUnknown, Unavailable
from virtua.jobs import runner
from virtua.jobs.plan import Plan
from virtua.jobs.record import JobStore, Undo
from virtua.jobs.recovery import Context, recover, undo_kind

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def etcd_url() -> Iterator[str]:
    with solo_etcd() as url:
        yield url


@pytest.fixture
def frozen_etcd(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A member of this test's own (it is SIGSTOPped): its URL and pid."""
    with etcd_cluster(tmp_path / "etcd", ["127.0.0.1"]) as (members, pids):
        yield members[0].client_url, pids[0]


def _is_marker_only(body: dict[str, Any]) -> bool:
    """A txn that writes nothing but the store's own marker (its creation, a fence)."""
    ops = body.get("success") or []
    return bool(ops) and all(b"/.txn" in base64.b64decode(next(iter(op.values()))["key"]) for op in ops)


def lose(s: EtcdStateStore, *, applied: bool, then: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """The store's next kv/txn of a write (not the creation of its marker) loses its answer:
    sent and applied, or never sent. Returns the bodies of the txns it lost (to replay them)."""
    real = s._http.post
    lost: list[dict[str, Any]] = []

    def post(url: str, **kw: Any) -> httpx.Response:
        if url.endswith("/v3/kv/txn") and not lost and not _is_marker_only(kw["json"]):
            lost.append(kw["json"])
            if applied:
                real(url, **kw)
            if then is not None:
                then()
            raise httpx.ReadTimeout("lost by the test")
        return real(url, **kw)

    s._http.post = post  # type: ignore[method-assign,assignment]
    return lost


def raw_get(url: str, key: str) -> Any:
    r = httpx.post(f"{url}/v3/kv/range", json={"key": base64.b64encode(key.encode()).decode()}, timeout=5)
    kvs = r.json().get("kvs") or []
    return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


def test_an_applied_txn_whose_answer_is_lost_is_a_success(etcd_url: str) -> None:
    """It used to raise Unavailable('may or may not have been applied') though the write was
    there: a caller undid work whose record etcd kept."""
    prefix = f"/t{uuid.uuid4().hex[:8]}/"
    s = EtcdStateStore(etcd_url, prefix=prefix)
    try:
        lose(s, applied=True)
        with s.txn():
            s.put("/vcs/a", {"v": 1})
        assert s.get("/vcs/a") == {"v": 1}
        with s.txn():  # the next one goes through (the marker's revision is known again)
            s.put("/vcs/b", {"v": 2})
        assert raw_get(etcd_url, prefix + "vcs/b") == {"v": 2}
    finally:
        s.close()


def test_a_txn_not_applied_is_a_definite_failure_and_can_never_apply(etcd_url: str) -> None:
    prefix = f"/t{uuid.uuid4().hex[:8]}/"
    s = EtcdStateStore(etcd_url, prefix=prefix)
    try:
        lost = lose(s, applied=False)
        with pytest.raises(Unavailable, match="not applied") as e:
            with s.txn():
                s.put("/vcs/a", {"v": 1})
        assert not isinstance(e.value, OutcomeUnknown)
        assert "may or may not" not in e.value.message.split("):")[-1]
        assert s.get("/vcs/a") is None
        # the lost request arriving late (still in flight in raft) is refused by etcd
        r = httpx.post(f"{etcd_url}/v3/kv/txn", json=lost[0], timeout=5).json()
        assert not r.get("succeeded"), r
        assert raw_get(etcd_url, prefix + "vcs/a") is None
        with s.txn():  # and the store goes on
            s.put("/vcs/a", {"v": 2})
        assert s.get("/vcs/a") == {"v": 2}
    finally:
        s.close()


def test_the_failpoints_lose_the_nth_answer_applied_or_not(etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """VIRTUA_ETCD_LOSE_ANSWER / VIRTUA_ETCD_DROP_TXN (for serve in a subprocess)."""
    s = EtcdStateStore(etcd_url, prefix=f"/t{uuid.uuid4().hex[:8]}/")
    try:
        monkeypatch.setattr(store_etcd, "_txns_sent", 0)
        monkeypatch.setenv("VIRTUA_ETCD_LOSE_ANSWER", "2")
        monkeypatch.setenv("VIRTUA_ETCD_DROP_TXN", "3")
        for i in (1, 2):
            with s.txn():
                s.put(f"/k{i}", {"v": i})
        with pytest.raises(Unavailable, match="not applied"), s.txn():
            s.put("/k3", {"v": 3})
        assert [s.get(f"/k{i}") for i in (1, 2, 3)] == [{"v": 1}, {"v": 2}, None]
    finally:
        s.close()


@pytest.mark.parametrize("applied", [True, False])
def test_etcd_away_after_a_lost_answer_is_outcome_unknown_then_settled(
    frozen_etcd: tuple[str, int], applied: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, pid = frozen_etcd
    monkeypatch.setattr(store_etcd, "RESOLVE_WAIT", 3.0)
    s = EtcdStateStore(url, prefix="/x/")
    try:
        lost = lose(s, applied=applied, then=lambda: os.killpg(pid, signal.SIGSTOP))
        with pytest.raises(OutcomeUnknown, match="may or may not have been applied") as e:
            with s.txn():
                s.put("/vcs/a", {"v": 1})
        assert e.value.txn
        with pytest.raises(Unavailable, match="not sent") as later:  # another write: definitely not applied
            with s.txn():
                s.put("/vcs/b", {"v": 2})
        assert not isinstance(later.value, OutcomeUnknown)
        os.killpg(pid, signal.SIGCONT)
        assert s.settle(e.value.txn) is applied
        assert s.settle(e.value.txn) is applied  # remembered
        assert s.get("/vcs/a") == ({"v": 1} if applied else None)
        if not applied:
            r = httpx.post(f"{url}/v3/kv/txn", json=lost[0], timeout=5).json()
            assert not r.get("succeeded") and s.get("/vcs/a") is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)
        s.close()


# ---------------------------------------------------------------- a job shaped like vc create


@undo_kind("test.rm-disk")
def _undo_disk(ctx: Context, path: str) -> None:
    Path(path).unlink(missing_ok=True)


@undo_kind("test.forget")
def _undo_record(ctx: Context, key: str) -> None:
    with ctx.manager.store.txn():
        ctx.manager.store.delete(key)


class _Manager:
    def __init__(self, store: EtcdStateStore) -> None:
        self.store = store


def vc_create_plan(s: EtcdStateStore, disk: Path) -> Plan:
    plan = Plan("vc create t")
    plan.add("clone disks", lambda: disk.write_bytes(b"disk"), lambda: disk.unlink(missing_ok=True),
             Undo(kind="test.rm-disk", args={"path": str(disk)}))

    def record() -> None:
        with s.txn():
            s.put("/vcs/t", {"disk": str(disk)})

    plan.add("record the VC", record, lambda: _undo_record(Context(None, _Manager(s)), "/vcs/t"),
             Undo(kind="test.forget", args={"key": "/vcs/t"}))
    return plan


@pytest.mark.parametrize("applied", [True, False])
def test_a_job_whose_record_write_loses_its_answer_keeps_disks_and_record_consistent(
    etcd_url: str, tmp_path: Path, applied: bool,
) -> None:
    """vc create's last step (the record) lost its answer: undoing the clones though etcd
    had the record left a VC without disks. Applied: the job succeeds, both are there; not
    applied: the job fails and is undone, both are gone."""
    s = EtcdStateStore(etcd_url, prefix=f"/t{uuid.uuid4().hex[:8]}/")
    jobs = JobStore(tmp_path / "jobs.db")
    disk = tmp_path / "vc-t-1.img"
    try:
        plan = vc_create_plan(s, disk)
        job = runner.start(jobs, "vc.create", {"name": "t"}, plan)
        lose(s, applied=applied)
        if applied:
            plan.run_sync(job)
            job.finish({"name": "t"})
        else:
            with pytest.raises(Unavailable, match="not applied"):
                plan.run_sync(job)
        assert disk.exists() is applied
        assert (s.get("/vcs/t") is not None) is applied
        assert jobs.get(job.id).state == ("done" if applied else "failed")
    finally:
        s.close()


@pytest.mark.parametrize("applied", [True, False])
def test_a_job_whose_record_write_is_outcome_unknown_undoes_nothing_and_recovery_settles_it(
    frozen_etcd: tuple[str, int], tmp_path: Path, applied: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """etcd SIGSTOPped as the record is written: OutcomeUnknown, nothing undone (the disks
    stay), the job stays running with its step 'unknown' and says what to check; etcd back,
    serve's job reaper (recover, expired_only) settles it: kept (applied) or all undone."""
    url, pid = frozen_etcd
    monkeypatch.setattr(store_etcd, "RESOLVE_WAIT", 3.0)
    s = EtcdStateStore(url, prefix="/y/")
    jobs = JobStore(tmp_path / "jobs.db")
    disk = tmp_path / "vc-t-1.img"
    ctx = Context(None, _Manager(s))
    try:
        plan = vc_create_plan(s, disk)
        job = runner.start(jobs, "vc.create", {"name": "t"}, plan)
        lose(s, applied=applied, then=lambda: os.killpg(pid, signal.SIGSTOP))
        with pytest.raises(OutcomeUnknown):
            plan.run_sync(job)
        assert disk.exists(), "nothing undone"
        rec = jobs.get(job.id)
        assert rec.state == "running" and [st.state for st in rec.steps] == ["done", "unknown"]
        assert rec.error and "Nothing was undone" in rec.error and rec.error_kind == "OutcomeUnknown"
        assert recover(jobs, ctx, expired_only=True) == []  # etcd still away: later
        assert disk.exists() and jobs.get(job.id).state == "running"
        os.killpg(pid, signal.SIGCONT)
        deadline = time.monotonic() + 15  # the reaper's next rounds (the store holds off 2 s after a failure)
        while not (got := recover(jobs, ctx, expired_only=True)) and time.monotonic() < deadline:
            time.sleep(0.5)
        [done] = got
        assert done.id == job.id and done.state == ("done" if applied else "undone"), done
        assert disk.exists() is applied
        assert (s.get("/vcs/t") is not None) is applied
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)
        s.close()


# ---------------------------------------------------------------- a lost write arriving late


def hold(s: EtcdStateStore) -> list[tuple[str, dict[str, Any]]]:
    """The store's next write request (a put, a delete or a txn, not one of its marker's own)
    is held, as a frozen member holds a request in its socket: not delivered now, the client
    sees a read timeout. Returns (url, body) of what was held, for the test to deliver later,
    as the member does when it resumes."""
    real = s._http.post
    held: list[tuple[str, dict[str, Any]]] = []

    def post(url: str, **kw: Any) -> httpx.Response:
        path = url.split("/v3/", 1)[1]
        if not held and path in ("kv/put", "kv/deleterange", "kv/txn") and not _is_marker_only(kw["json"]):
            held.append((url, kw["json"]))
            raise httpx.ReadTimeout("held by the test")
        return real(url, **kw)

    s._http.post = post  # type: ignore[method-assign,assignment]
    return held


def _write(s: EtcdStateStore, kind: str) -> None:
    if kind == "put":
        s.put("/q", {"n": 3})
    elif kind == "delete":
        s.delete("/q")
    else:
        with s.txn():
            s.put("/q", {"n": 3})


@pytest.mark.parametrize("claimed", [False, True], ids=["no-claim", "claim"])
@pytest.mark.parametrize("kind", ["put", "delete", "txn"])
def test_a_write_without_an_answer_arriving_late_does_not_overwrite_an_acknowledged_one(
    etcd_url: str, kind: str, claimed: bool,
) -> None:
    """The lost-write sequence of test_state_store_contract's quorum test, made deterministic:
    put n=1; a write gets no answer (it sits in a frozen member's socket); the caller is told
    it failed; put n=4 is acknowledged; the member resumes and applies the held request. A
    plain put/delete (no compare) then overwrote n=4: get said n=3 (or nothing) after n=4
    was acknowledged. Every write is now conditional on the marker, and the lost one was
    fenced before n=4 was sent: it can no longer apply."""
    prefix = f"/t{uuid.uuid4().hex[:8]}/"
    s = EtcdStateStore(etcd_url, prefix=prefix)
    try:
        if claimed:
            s.claim({"pid": os.getpid()}, ttl=30)
        s.put("/q", {"n": 1})
        held = hold(s)
        with pytest.raises(Unavailable, match="not applied") as e:
            _write(s, kind)
        assert not isinstance(e.value, OutcomeUnknown)
        assert held, "the write was held"
        assert s.get("/q") == {"n": 1}
        s.put("/q", {"n": 4})  # acknowledged
        url, body = held[0]
        httpx.post(url, json=body, timeout=5).raise_for_status()  # the held request arrives late
        assert raw_get(etcd_url, prefix + "q") == {"n": 4}, "an acknowledged write was overwritten"
        assert s.get("/q") == {"n": 4}
    finally:
        s.close()


def test_a_lost_first_write_can_not_apply_once_its_store_closed(etcd_url: str) -> None:
    """A store without a claim removes its marker key on close: a lost transaction that was
    conditional on the marker being absent (the store's first write) could then apply, after
    writes that were acknowledged. The marker exists before any write is conditional on it."""
    prefix = f"/t{uuid.uuid4().hex[:8]}/"
    s = EtcdStateStore(etcd_url, prefix=prefix)
    held = hold(s)
    with pytest.raises(Unavailable, match="not applied"), s.txn():
        s.put("/q", {"n": 3})
    s.put("/q", {"n": 4})
    s.close()
    url, body = held[0]
    httpx.post(url, json=body, timeout=5).raise_for_status()
    assert raw_get(etcd_url, prefix + "q") == {"n": 4}


def test_an_unanswered_put_held_by_a_frozen_member_does_not_apply_after_a_later_acknowledged_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The quorum test's sequence with real members, resumed one at a time: two of three
    frozen, put n=3 gets no answer; one resumes (quorum), put n=4 is acknowledged; the other
    resumes with what it was sent while frozen. The put used to be retried on every member
    (repeating it was thought harmless) and the third member applied it late, after n=4."""
    monkeypatch.setattr(store_etcd, "RESOLVE_WAIT", 2.0)
    monkeypatch.setattr(store_etcd, "HOLD_DOWN", 0.0)
    with etcd_cluster(tmp_path / "etcd", ["127.0.0.1"] * 3) as (members, pids):
        s = EtcdStateStore(",".join(m.client_url for m in members), prefix="/z/", read_timeout=1.0)
        try:
            s.put("/q", {"n": 1})
            for pid in pids[1:]:
                os.killpg(pid, signal.SIGSTOP)
            with pytest.raises(Unavailable, match="no quorum"):
                s.put("/q", {"n": 3})
            os.killpg(pids[1], signal.SIGCONT)
            put_once_back(s, "/q", {"n": 4})
            os.killpg(pids[2], signal.SIGCONT)
            time.sleep(3)  # the third member catches up and handles what it holds
            assert s.get("/q") == {"n": 4}
            assert raw_get(members[0].client_url, "/z/q") == {"n": 4}
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGCONT)
            s.close()
