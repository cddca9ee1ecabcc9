"""Attacks on EtcdStateStore's call budget, background probe and claim re-take, on a real
etcd (etcd-server 3.4 on loopback)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import virtua.cluster.store_etcd as store_etcd
from tests.helpers.etcd import etcd_cluster, solo_etcd
from virtua.cluster.store_etcd import EtcdStateStore
from virtua.errors import Busy, Unavailable

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def etcd_url() -> Iterator[str]:
    with solo_etcd() as url:
        yield url


def _prefix() -> str:
    return f"/t{uuid.uuid4().hex[:8]}/"


@pytest.mark.parametrize("noticed_by", ["keep_claim", "a write"])
def test_a_serve_replaced_while_stalled_does_not_take_the_claim_back_after_its_successor_left(
    etcd_url: str, noticed_by: str
) -> None:
    """first stalls past its lease (SIGSTOP, a frozen VM); second claims the prefix, manages
    it (its job recovery undoes first's job step, say) and stops. When first resumes, the
    claim is absent again: first must not take it back and write on as if it had managed
    all along (its in-memory state and jobs predate second's). It did: _retake_claim takes
    any absent claim, and the marker that moved under second's writes is taken as "once
    more" by _send_commit."""
    prefix = _prefix()
    first, second = EtcdStateStore(etcd_url, prefix=prefix), EtcdStateStore(etcd_url, prefix=prefix)
    try:
        first.claim({"pid": 1}, ttl=30)
        first.put("/jobs/j1", {"state": "running", "by": "first"})
        first._call("lease/revoke", {"ID": first._claim_lease}, idempotent=True)  # its lease ran out
        second.claim({"pid": 2}, ttl=30)  # meanwhile another serve took over the prefix
        second.put("/jobs/j1", {"state": "undone", "by": "second"})  # its recovery undid first's job
        second.release_claim()  # and it stopped
        with pytest.raises(Busy):
            if noticed_by == "keep_claim":
                first.keep_claim()
            else:
                first.put("/jobs/j1", {"state": "done", "by": "first, stale"})
        with pytest.raises(Busy):
            first.put("/jobs/j1", {"state": "done", "by": "first, stale"})
        assert second.get("/jobs/j1") == {"state": "undone", "by": "second"}
    finally:
        first.close()
        second.close()


def test_a_retake_that_fails_does_not_leave_a_serve_writing_without_its_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim went with its lease; keep_claim finds it gone and takes it again, but etcd
    fails the lease grant (it is away again, or the call's budget ran out). The store must
    still know it has to hold the claim: it must not go on writing with no claim condition
    (another serve could claim the prefix and both would write) nor stop renewing."""
    with etcd_cluster(tmp_path / "etcd", ["127.0.0.1"]) as (members, pids):
        url = members[0].client_url
        prefix = _prefix()
        first = EtcdStateStore(url, prefix=prefix, probe_in_background=True)
        second = EtcdStateStore(url, prefix=prefix)
        try:
            first.claim({"pid": 1}, ttl=30)
            first.put("/hosts/a", {"by": "first"})
            first._call("lease/revoke", {"ID": first._claim_lease}, idempotent=True)
            real = first._call

            def call(path: str, body: dict[str, Any], *, idempotent: bool) -> dict[str, Any]:
                if path == "lease/grant":  # etcd goes away right then (a frozen member)
                    monkeypatch.setattr(first, "_call", real)
                    os.killpg(pids[0], signal.SIGSTOP)
                    try:
                        return real(path, body, idempotent=idempotent)
                    finally:
                        os.killpg(pids[0], signal.SIGCONT)
                return real(path, body, idempotent=idempotent)

            monkeypatch.setattr(first, "_call", call)
            with pytest.raises(Unavailable):
                first.keep_claim()
            deadline = time.monotonic() + 10
            while first._held_down():  # the background probe sees etcd again
                assert time.monotonic() < deadline
                time.sleep(0.1)
            second.claim({"pid": 2}, ttl=30)  # the prefix looks free: another serve takes it
            with contextlib.suppress(Busy):
                first.keep_claim()  # the renewal must not be a no-op now
            with contextlib.suppress(Busy):
                first.put("/hosts/a", {"by": "first, without its claim"})
            assert second.get("/hosts/a") == {"by": "first"}, "first wrote while second held the claim"
        finally:
            with contextlib.suppress(Exception):
                second.release_claim()
            first.close()
            second.close()


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[tuple[list[Any], list[int]]]:
    with etcd_cluster(tmp_path, ["127.0.0.1"] * 3) as c:
        yield c


def test_one_frozen_member_of_three_leaves_an_event_loop_callers_write_settled(
    trio: tuple[list[Any], list[int]]
) -> None:
    """The member serve talks to freezes (SIGSTOP; a host gone silent), the other two keep
    the quorum. A write sent to it times out (2 s of the 3 s budget); the fence that settles
    it went to the same frozen member again (the store's current endpoint does not move on a
    timeout), used up the budget there, and the write was OutcomeUnknown (saying "no
    quorum") though two members could have settled it at once."""
    members, pids = trio
    s = EtcdStateStore(",".join(m.client_url for m in members), prefix=_prefix(), probe_in_background=True)
    try:
        s.claim({"pid": 1}, ttl=30)
        s.put("/a", {"n": 0})
        os.killpg(pids[s._current], signal.SIGSTOP)
        t = time.monotonic()
        try:
            s.put("/a", {"n": 1})
        except Unavailable as e:
            assert "not applied" in e.message, e.message  # settled: not OutcomeUnknown
        took = time.monotonic() - t
        assert s._pending is None, "the lost write was left unsettled with a quorum up"
        assert took < store_etcd.CALL_BUDGET + 0.5, took
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGCONT)
        s.close()


@pytest.mark.parametrize("background", [True, False], ids=["serve", "cli"])
def test_two_silent_members_of_five_first_in_the_list_do_not_hold_a_store_off_a_quorum(
    tmp_path: Path, background: bool
) -> None:
    """Five members, the first two in the endpoint list silent (SIGSTOP; hosts gone without
    a reset), three up: a quorum. Each call spent its 3 s budget on those two (2 s, then
    the 1 s left) and never reached a live member, and the store's current endpoint only
    moves on an answer: every call failed, for as long as the two stayed silent (the
    background probe saw member 3 answer, and let the next call fail again the same way).
    A CLI's store (no background probe) too: its calls got the same budget each."""
    with etcd_cluster(tmp_path, ["127.0.0.1"] * 5) as (members, pids):
        s = EtcdStateStore(",".join(m.client_url for m in members), prefix=_prefix(),
                           probe_in_background=background)
        try:
            s.put("/a", {"n": 0})
            for pid in pids[:2]:
                os.killpg(pid, signal.SIGSTOP)
            for call in (lambda: s.get("/a"), lambda: s.put("/a", {"n": 1})):  # reads alone, then writes
                deadline = time.monotonic() + 15
                while True:
                    try:
                        call()
                        break
                    except Unavailable as e:
                        assert time.monotonic() < deadline, f"no call got through with 3 of 5 members up: {e.message}"
                        time.sleep(0.2)
            assert s.get("/a") == {"n": 1}
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGCONT)
            s.close()


def test_a_call_out_of_budget_does_not_mark_a_healthy_etcd_sick(etcd_url: str) -> None:
    """A txn() on serve's store has one budget from its start to its commit: a body that
    takes longer (here 3 s of the caller's own time) finds no time left to commit. That
    fails the txn, but said nothing about etcd: it was taken as etcd failing, the store
    marked sick, and the next call on a healthy etcd failed at once too."""
    s = EtcdStateStore(etcd_url, prefix=_prefix(), probe_in_background=True)
    try:
        s.put("/a", {"n": 0})
        with pytest.raises(Unavailable, match="no time left"):
            with s.txn():
                s.get("/a")
                time.sleep(store_etcd.CALL_BUDGET + 0.05)
                s.put("/a", {"n": 1})
        assert not s._held_down()
        assert s.get("/a") == {"n": 0}
    finally:
        s.close()


def test_a_store_whose_first_check_fails_leaves_no_probe_thread_behind() -> None:
    """serve with --etcd at an address nobody answers: the constructor's check fails, and
    before, the probe it started kept polling the dead address for the process's life."""
    import socket
    import threading

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Unavailable):
        EtcdStateStore(f"http://127.0.0.1:{port}", prefix=f"/t-{uuid.uuid4().hex[:8]}", probe_in_background=True)
    deadline = time.monotonic() + 3 * store_etcd.PROBE_EVERY + 1
    while any(t.name == "etcd-probe" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a probe thread outlived the store that failed to start"
        time.sleep(0.1)
