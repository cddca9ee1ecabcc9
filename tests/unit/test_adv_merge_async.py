"""Adversarial: head-down merge with writes in flight, pins, flatten, reopen."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from virtua.storage.pool import Pool
from virtua.storage.volume import SnapshotDevice, VolumeDevice

CHUNK = 4096
N = 64


def _setup(tmp_path: Path) -> tuple[Pool, VolumeDevice, bytearray]:
    pool = Pool.create(tmp_path / "pool", "p", capacity=8 * N * CHUNK, chunk_size=CHUNK)
    pool.create_volume("v", N * CHUNK)
    dev = VolumeDevice(pool, pool.volume("v"))
    expect = bytearray()
    for c in range(N):
        b = bytes([c % 200 + 1]) * CHUNK
        dev.write(c * CHUNK, b)
        expect += b
    return pool, dev, expect


def _check(pool: Pool, dev: VolumeDevice, expect: bytearray, path: Path) -> None:
    assert dev.read(0, N * CHUNK) == bytes(expect)
    r = pool.check()
    assert r["ok"], r["problems"]
    pool.close()
    again = Pool(path)
    assert VolumeDevice(again, again.volume("v")).read(0, N * CHUNK) == bytes(expect)
    r = again.check()
    assert r["ok"], r["problems"]
    again.close()


def test_writes_in_flight_while_the_snapshot_goes(tmp_path: Path) -> None:
    pool, dev, expect = _setup(tmp_path)
    pool.create_snapshot("v", "held")
    old_head = pool.volume("v").layer
    plans = []
    for c in (3, 10, 11):  # copy-on-write into the head: new chunks of the old head id
        data = memoryview(bytes([0xA0 + c]) * 3000)
        plans.append(dev.start_write(c * CHUNK + 500, data))
        expect[c * CHUNK + 500 : c * CHUNK + 3500] = bytes(data)

    def workers() -> None:
        time.sleep(0.3)
        for p in plans:
            p.execute()

    t = threading.Thread(target=workers)
    t.start()
    pool.delete_snapshot("v", "held")  # its flush waits for them and ends them
    t.join()
    for p in plans:
        p.end()  # the server's completion callback, after: a no-op
    assert pool.volume("v").layer != old_head, "the head went down"
    assert old_head not in pool.layers
    # later writes overwrite in place (what was the snapshot's is the volume's own)
    free = pool.free_chunks
    dev.write(20 * CHUNK, b"\x55" * CHUNK)
    expect[20 * CHUNK : 21 * CHUNK] = b"\x55" * CHUNK
    assert pool.free_chunks == free
    _check(pool, dev, expect, tmp_path / "pool")


def test_a_pinned_volume_keeps_its_head_and_a_snapshot_of_a_clone_source_is_never_overwritten(tmp_path: Path) -> None:
    pool, dev, expect = _setup(tmp_path)
    pool.create_snapshot("v", "a")
    pool.create_snapshot("v", "b")
    clones = pool.clone("v", "a", "c")
    cdev = VolumeDevice(pool, clones[0])
    base = bytes(expect)
    dev.write(0, b"\x99" * 10)
    expect[0:10] = b"\x99" * 10
    pool.delete_snapshot("v", "b")  # the layer of b: nameless, under the head: goes down
    dev.write(5 * CHUNK, b"\x77" * CHUNK)  # a chunk of @a's layer: must be copied, never in place
    expect[5 * CHUNK : 6 * CHUNK] = b"\x77" * CHUNK
    assert cdev.read(0, N * CHUNK) == base
    assert SnapshotDevice(pool, pool.snapshot("v", "a")).read(0, N * CHUNK) == base
    pin = pool.pin(pool.volume("v"), "exported")
    try:
        head = pool.volume("v").layer
        pool.delete_volume("c")
        assert pool.volume("v").layer == head, "a pinned volume's head stays"
    finally:
        pool.unpin(pool.volume("v").id, pin)
    _check(pool, dev, expect, tmp_path / "pool")


def test_a_flush_in_flight_and_writes_on_the_loop_while_the_snapshot_goes(tmp_path: Path) -> None:
    import asyncio

    pool, dev, expect = _setup(tmp_path)
    pool.create_snapshot("v", "held")

    async def go() -> None:
        loop = asyncio.get_running_loop()
        for c in (2, 30):
            d = bytes([0xC0 + c]) * 100
            plan = dev.start_write(c * CHUNK, memoryview(d))
            expect[c * CHUNK : c * CHUNK + 100] = d
            await loop.run_in_executor(None, plan.execute)
            plan.end()
        dev.write_zeroes(40 * CHUNK, CHUNK)  # a ZERO row over the snapshot's data, pending
        expect[40 * CHUNK : 41 * CHUNK] = bytes(CHUNK)
        pending = asyncio.ensure_future(pool.flush_async())  # its commit in a thread
        await asyncio.sleep(0)
        slow = dev.start_write(50 * CHUNK + 7, memoryview(b"\xde" * 9))  # still on its way
        expect[50 * CHUNK + 7 : 50 * CHUNK + 16] = b"\xde" * 9
        fut = loop.run_in_executor(None, lambda: (time.sleep(0.2), slow.execute()))
        pool.delete_snapshot("v", "held")
        await fut
        slow.end()
        await pending
        dev.write(41 * CHUNK, b"\x11" * CHUNK)
        expect[41 * CHUNK : 42 * CHUNK] = b"\x11" * CHUNK
        await pool.flush_async()

    asyncio.run(go())
    _check(pool, dev, expect, tmp_path / "pool")
