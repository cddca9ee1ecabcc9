"""FLUSH never blocks other clients, and still waits for what it promises: the fdatasync
and the metadata commit run in a thread (Pool.flush_async), replies to FLUSH and FUA
writes come when every write acknowledged before them is durable and committed."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtua.storage.pool as pool_module
from tests.helpers.crash_flush import measure
from tests.helpers.crash_server import CrashServer
from virtua.nbd import proto as P
from virtua.nbd.client import NBDClient
from virtua.storage.pool import Pool
from virtua.storage.service import Storage
from virtua.storage.volume import VolumeDevice

MIB = 1 << 20
CHUNK = 4096


@pytest.fixture
def held_fdatasync(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """fdatasync in worker threads waits until the event is set: a flush held in flight."""
    release = threading.Event()
    real = os.fdatasync
    main = threading.main_thread()

    def fdatasync(fd: int) -> None:
        if threading.current_thread() is not main:
            assert release.wait(30), "the test never released the flush"
        real(fd)

    monkeypatch.setattr(pool_module.os, "fdatasync", fdatasync)
    yield release
    release.set()


def test_rows_of_a_commit_in_flight_stay_visible_and_freed_chunks_wait(
    tmp_path: Path, held_fdatasync: threading.Event
) -> None:
    pool = Pool.create(tmp_path / "p", "p", capacity=64 << 20, chunk_size=CHUNK)
    a = VolumeDevice(pool, pool.create_volume("a", 64 * CHUNK))
    b = VolumeDevice(pool, pool.create_volume("b", 64 * CHUNK))
    a.write(0, b"a" * (4 * CHUNK))
    pool.flush()
    a.discard(0, CHUNK)  # frees a's first chunk: reusable only once its commit is durable
    a.write(8 * CHUNK, b"n" * CHUNK)  # a new chunk whose row the commit carries
    freed = [p for p in pool._pending_free]

    async def scenario() -> None:
        first = asyncio.ensure_future(pool.flush_async())
        await asyncio.sleep(0.05)
        assert not first.done(), "the flush replied before its fdatasync"
        # the loop is free: readers build maps from the metadata while the commit is in flight
        a.vol.map = None
        assert a.read(8 * CHUNK, CHUNK) == b"n" * CHUNK
        assert a.read(0, CHUNK) == bytes(CHUNK)
        b.write(0, b"b" * CHUNK)  # must not get the chunk freed above: not durable yet
        assert not set(freed) & {b.vol.map.get(0)}  # type: ignore[union-attr]
        second = asyncio.ensure_future(pool.flush_async())
        third = asyncio.ensure_future(pool.flush_async())
        await asyncio.sleep(0.05)
        assert not second.done() and not third.done()
        held_fdatasync.set()
        await asyncio.wait_for(asyncio.gather(first, second, third), 30)

    asyncio.run(scenario())
    assert set(freed) <= set(pool.free), "freed chunks were not recycled after the commit"
    pool.close()
    reopened = Pool(tmp_path / "p")
    a2 = VolumeDevice(reopened, reopened.volume("a"))
    b2 = VolumeDevice(reopened, reopened.volume("b"))
    assert a2.read(8 * CHUNK, CHUNK) == b"n" * CHUNK
    assert b2.read(0, CHUNK) == b"b" * CHUNK
    assert reopened.check()["ok"]
    reopened.close()


def test_many_rows_without_a_flush_commit_in_the_flush_thread(
    tmp_path: Path, held_fdatasync: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The automatic commit (a client that writes gigabytes and never flushes) ran
    fdatasync inline, on the server's loop: every other client stalled for its length."""
    monkeypatch.setattr(pool_module, "AUTO_COMMIT_ROWS", 8)
    pool = Pool.create(tmp_path / "p", "p", capacity=64 << 20, chunk_size=CHUNK)
    a = VolumeDevice(pool, pool.create_volume("a", 64 * CHUNK))

    async def scenario() -> None:
        for i in range(12):  # past the mark: each write returns, the fdatasync is held
            a.write(i * CHUNK, bytes([65 + i]) * CHUNK)
        assert pool._job is not None, "the commit went to the flush thread"
        assert a.read(0, CHUNK) == b"A" * CHUNK, "rows in flight stay visible"
        held_fdatasync.set()
        await asyncio.wait_for(pool.flush_async(), 30)

    asyncio.run(scenario())
    pool.close()
    reopened = Pool(tmp_path / "p")
    a2 = VolumeDevice(reopened, reopened.volume("a"))
    assert [a2.read(i * CHUNK, 1) for i in range(12)] == [bytes([65 + i]) for i in range(12)]
    assert reopened.check()["ok"]
    reopened.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CrashServer]:
    st = Storage(tmp_path / "home")
    st.create_pool("f", capacity=4 << 30)
    st.pool("f").create_volume("r", 64 * MIB)
    st.pool("f").create_volume("w", 1 << 30)
    st.close()
    srv = CrashServer(tmp_path / "home").start()
    yield srv
    srv.kill()


def test_a_flush_reply_means_durable_even_if_killed_right_after(server: CrashServer) -> None:
    c = NBDClient.connect(port=server.port).open("f/w")
    data = os.urandom(MIB)
    for i in range(8):  # new chunks: their rows exist only in memory until the commit
        c.write(i * MIB, data)
    c.flush()
    c.write(9 * MIB, data, P.CMD_FLAG_FUA)
    server.kill()  # right after the replies
    server.start()
    c = NBDClient.connect(port=server.port).open("f/w")
    for i in range(8):
        assert c.read(i * MIB, MIB) == data, f"MiB {i} lost though its FLUSH was answered"
    assert c.read(9 * MIB, MIB) == data, "a FUA write lost though it was answered"
    c.disconnect()


def test_one_clients_flush_does_not_stall_another_clients_reads(server: CrashServer, tmp_path: Path) -> None:
    r = measure(server.port, "f/r", "f/w", tmp_path, dirty_bytes=64 * MIB, seconds=3.0)
    print(r)
    assert r.flushes >= 3 and r.flush_reads >= 50, f"too few flushes or reads during them to judge: {r}"
    # Inline, a read waits for the whole fdatasync (p99 ~ the flush: 45 ms measured).
    # Off the loop it waits at most for the loop's share of the work; this machine's
    # noise (2 cores, other jobs) is far above the 2x goal, hence the generous bound.
    bound_us = max(3 * r.idle_p99_us, r.flush_ms * 1000 / 4)
    assert r.flush_p99_us <= bound_us, f"reads stalled by another client's flush: {r}"


def test_a_flush_syncs_whenever_data_was_written_and_only_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = Pool.create(tmp_path / "p", "p", capacity=64 << 20, chunk_size=CHUNK)
    a = VolumeDevice(pool, pool.create_volume("a", 64 * CHUNK))
    a.write(0, b"a" * CHUNK)
    pool.flush()
    synced: list[int] = []
    real = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(pool_module.os, "fdatasync", counting_fdatasync)

    async def flushes() -> None:
        await pool.flush_async()
        assert synced == [], "nothing was written: a FLUSH needs no fdatasync"
        a.write(100, b"in place")  # an owned chunk: no new row, but dirty pages
        await pool.flush_async()
        assert synced == [pool.data_fd], "an in-place overwrite was not synced"

    asyncio.run(flushes())
    pool.close()
