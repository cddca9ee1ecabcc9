"""Adversarial: revoked.json written by another process, malformed or torn."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from virtua.api import daemon
from virtua.pki.ca import ClusterCA


def _ca(tmp_path: Path) -> ClusterCA:
    return ClusterCA.ensure(tmp_path / "pki", manager_sans=["127.0.0.1"])


@pytest.mark.parametrize("bad", ["[null]", "7", '{"a": 1}', '["zz"]', "[1.5e999]", "[1"])
def test_a_malformed_revocation_list_does_not_stop_the_watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              bad: str) -> None:
    ca = _ca(tmp_path)
    told: list[int] = []
    ca.on_revoke.append(lambda: told.append(len(ca.revoked)))
    monkeypatch.setattr(daemon, "REVOCATION_POLL", 0.02)
    path = tmp_path / "pki" / "revoked.json"

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon._watch_revocations(ca, stop))
        path.write_text(bad)
        await asyncio.sleep(0.15)
        assert not task.done(), f"the watch ended on {bad!r}: {task.exception() if task.done() else ''}"
        path.write_text(json.dumps([0x1234]))
        os.utime(path, ns=(os.stat(path).st_mtime_ns + 10**9,) * 2)
        for _ in range(50):
            if told:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 2)

    asyncio.run(run())
    assert told, "a revocation written after a malformed list never reached on_revoke"
    assert ca.is_revoked(0x1234)


def test_a_torn_revocation_list_is_read_again_when_complete(tmp_path: Path) -> None:
    """A reader that caught another process's file half written: the whole file, written
    within the file system's timestamp granularity (same mtime), must still be read."""
    ca = _ca(tmp_path)
    path = tmp_path / "pki" / "revoked.json"
    path.write_text("[4660, 46")
    mtime = os.stat(path).st_mtime_ns
    with pytest.raises(ValueError):
        ca.poll_revoked()
    path.write_text("[4660, 4661]")
    os.utime(path, ns=(mtime, mtime))  # a coarse clock: the same mtime as the torn one
    assert ca.poll_revoked()
    assert ca.is_revoked(4660) and ca.is_revoked(4661)


def test_a_revocation_still_goes_through_a_malformed_list_and_mends_it(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    path = tmp_path / "pki" / "revoked.json"
    path.write_text("[null]")
    assert not ca.is_revoked(99), "a request is answered from what is known"
    ca.revoke_serials([99], "test")
    assert json.loads(path.read_text()) == [99]
    assert ca.poll_revoked() is False and ca.is_revoked(99)
