"""kill -9 a writer under load at random moments: every flushed write survives and the
pool checks clean after every crash (20+ trials on one pool, so allocator state carries
over from crash to crash)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.crash_writer import BLOCK, ops, payload
from virtua.storage.pool import Pool
from virtua.storage.volume import SnapshotDevice, VolumeDevice

ROOT = Path(__file__).resolve().parents[2]
TRIALS = int(os.environ.get("VIRTUA_CRASH_TRIALS", "24"))
VOLUME_BLOCKS = 1024  # 4 MiB


def replay(seed: int, upto: int) -> dict[int, bytes]:
    state: dict[int, bytes] = {}
    for rnd in range(1, upto + 1):
        apply_round(state, seed, rnd)
    return state


def apply_round(state: dict[int, bytes], seed: int, rnd: int, trace: dict[int, set[bytes]] | None = None) -> None:
    for kind, start, count in ops(seed, rnd, VOLUME_BLOCKS):
        data = payload(rnd, start, count) if kind == "write" else bytes(count * BLOCK)
        for i in range(count):
            block = data[i * BLOCK : (i + 1) * BLOCK]
            state[start + i] = block
            if trace is not None:
                trace.setdefault(start + i, set()).add(block)


def test_kill9_loses_no_flushed_write(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    Pool.create(path, "crash", capacity=256 << 20).close()
    rng = random.Random(1234)
    zero = bytes(BLOCK)
    verified_rounds = 0
    for trial in range(TRIALS):
        vol = f"v{trial}"
        with Pool(path) as pool:
            pool.create_volume(vol, VOLUME_BLOCKS * BLOCK)
        log = tmp_path / f"log{trial}"
        log.touch()
        seed = rng.randrange(1 << 30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.crash_writer", str(path), vol, str(seed), str(log)],
            cwd=ROOT,
        )
        # the kill point counts from the writer's first round, not its start-up (1 s or
        # more of imports on a loaded machine)
        deadline = time.monotonic() + 60
        while not log.stat().st_size and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.75))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lines = log.read_text().split()
        done = [int(x) for x in lines if x.isdigit()]
        deleted = {int(lines[i + 1]) for i, x in enumerate(lines) if x == "d"}
        snaps = [int(lines[i + 1]) for i, x in enumerate(lines) if x == "s"]
        snaps = [s for s in snaps if s not in deleted]
        last = max(done, default=0)
        verified_rounds += last

        pool = Pool(path)
        try:
            report = pool.check()
            assert report["ok"], f"trial {trial}: {report['problems']}"
            state = replay(seed, last)
            maybe: dict[int, set[bytes]] = {}
            apply_round(dict(state), seed, last + 1, maybe)  # the round in flight may be partly there
            got = VolumeDevice(pool, pool.volume(vol)).read(0, VOLUME_BLOCKS * BLOCK)
            for b in range(VOLUME_BLOCKS):
                have = got[b * BLOCK : (b + 1) * BLOCK]
                want = state.get(b, zero)
                if have != want:
                    assert have in maybe.get(b, set()), (
                        f"trial {trial} block {b}: flushed data lost after round {last}: "
                        f"have {have[:16]!r}, want {want[:16]!r}"
                    )
            for s in snaps:
                if s > last:
                    continue
                snap_state = replay(seed, s)
                dev = SnapshotDevice(pool, pool.snapshot(vol, f"r{s}"))
                data = dev.read(0, VOLUME_BLOCKS * BLOCK)
                for b in range(VOLUME_BLOCKS):
                    assert data[b * BLOCK : (b + 1) * BLOCK] == snap_state.get(b, zero), (
                        f"trial {trial}: snapshot r{s} block {b} differs"
                    )
            if trial % 2:  # free space too, so later trials reuse freed chunks
                pool.delete_volume(vol, recursive=True)
                assert pool.check()["ok"]
        finally:
            pool.close()
    assert verified_rounds > TRIALS, "the writer barely ran: the test proves nothing"


@pytest.mark.parametrize("chunk", [4096, 65536])
def test_enospc_keeps_data_and_recovers(tmp_path: Path, chunk: int) -> None:
    from virtua.errors import NoSpace

    pool = Pool.create(tmp_path / "p", "full", capacity=8 * chunk, chunk_size=chunk)
    a = VolumeDevice(pool, pool.create_volume("a", 64 * chunk))
    b = VolumeDevice(pool, pool.create_volume("b", 64 * chunk))
    a.write(0, b"A" * (6 * chunk))
    a.flush()
    with pytest.raises(NoSpace, match="full"):
        b.write(0, b"B" * (3 * chunk))  # needs 3, 2 free: refused whole
    assert b.read(0, 3 * chunk) == bytes(3 * chunk)
    b.write(0, b"B" * (2 * chunk))
    with pytest.raises(NoSpace):
        b.write(5 * chunk, b"x")
    with pytest.raises(NoSpace):
        a.write(10 * chunk, b"x" * 10)
    assert a.read(0, 6 * chunk) == b"A" * (6 * chunk)
    assert b.read(0, 2 * chunk) == b"B" * (2 * chunk)
    # overwriting what a volume owns needs no space
    a.write(chunk, b"C" * chunk)
    a.discard(0, 4 * chunk)  # frees 4 chunks
    b.write(5 * chunk, b"y" * 100)
    assert b.read(5 * chunk, 100) == b"y" * 100
    assert a.read(0, 4 * chunk) == bytes(4 * chunk)
    assert a.read(4 * chunk, 2 * chunk) == b"A" * (2 * chunk)
    assert pool.check()["ok"]
    pool.close()


SERVER_KILL_POINTS = int(os.environ.get("VIRTUA_SERVER_KILL_POINTS", "20"))


def _kill_points(tmp_path: Path, points: int, *, seed: int, serve: bool) -> Any:
    """Run the crash workload for this many kill points; its stats."""
    from tests.helpers.crash_workload import CrashWorkload

    work = CrashWorkload(tmp_path / "home", seed=seed, serve=serve)
    try:
        for _ in range(points):
            work.kill_point()
    finally:
        work.close()
    return work.stats


def test_kill9_of_the_server_under_a_random_workload_never_shows_foreign_bytes(tmp_path: Path) -> None:
    """The real NBD server and operations over several volumes (writes, zeroes, trims,
    flushes, FUA, snapshots, clones, removals, flatten), killed at random moments: after
    each restart every byte is its volume's flushed data or its own newer data."""
    stats = _kill_points(tmp_path, SERVER_KILL_POINTS, seed=20261201, serve=False)
    assert stats.kill_points == SERVER_KILL_POINTS
    assert stats.ops > 5 * SERVER_KILL_POINTS, "the workload barely ran: the test proves nothing"
    assert not stats.violations, "\n".join(stats.violations)


def test_kill9_of_virtua_serve_itself_keeps_the_same_promise(tmp_path: Path) -> None:
    """The same workload against the whole daemon (API, manager, cluster CA, edge limits):
    what is killed is `virtua serve`, operations go through its API socket."""
    points = max(3, SERVER_KILL_POINTS // 4)
    stats = _kill_points(tmp_path, points, seed=20261202, serve=True)
    assert stats.kill_points == points and stats.ops > 5 * points, stats
    assert not stats.violations, "\n".join(stats.violations)
