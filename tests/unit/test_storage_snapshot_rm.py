"""Removing a snapshot costs what the smaller side of the merge holds.

An export holds an idle volume still through a snapshot and removes it when the copy is
done: the snapshot's layer is the whole volume, the head above it almost empty. Merging
the layer up into the head rewrote every row of the volume (30 ms a GiB at 64 KiB chunks,
seconds for a large volume); the head's few rows now go down instead.
"""

from __future__ import annotations

from pathlib import Path

from virtua.storage.pool import Pool
from virtua.storage.volume import SnapshotDevice, VolumeDevice

CHUNK = 4096
CHUNKS = 600


def _pool(tmp_path: Path) -> Pool:
    return Pool.create(tmp_path / "pool", "p", capacity=4 * CHUNKS * CHUNK, chunk_size=CHUNK)


def _fill(dev: VolumeDevice) -> bytearray:
    expect = bytearray()
    for c in range(CHUNKS):
        block = bytes([c % 251 + 1]) * CHUNK
        dev.write(c * CHUNK, block)
        expect += block
    return expect


def test_removing_a_big_snapshot_under_a_small_head_rewrites_only_the_head(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    pool.create_volume("v", CHUNKS * CHUNK)
    dev = VolumeDevice(pool, pool.volume("v"))
    expect = _fill(dev)
    pool.create_snapshot("v", "held")
    dev.write(5 * CHUNK + 100, b"\xee" * 10)  # the head: one copied-on-write chunk
    expect[5 * CHUNK + 100 : 5 * CHUNK + 110] = b"\xee" * 10
    dev.write_zeroes(7 * CHUNK, CHUNK)  # and one zeroed over the snapshot's data
    expect[7 * CHUNK : 8 * CHUNK] = bytes(CHUNK)
    pool.flush()
    free = pool.free_chunks
    changes = pool.db.total_changes
    pool.delete_snapshot("v", "held")
    assert pool.db.total_changes - changes < 20, "the snapshot's rows were rewritten, not the head's"
    assert pool.free_chunks == free + 2, "the chunks the head replaced (a copy, a zeroed one) are free again"
    assert dev.read(0, CHUNKS * CHUNK) == bytes(expect)
    # what the snapshot held is the volume's own now: overwritten in place, no new chunk
    dev.write(9 * CHUNK, b"\x01" * CHUNK)
    dev.write(5 * CHUNK, b"\x02" * 50)
    expect[9 * CHUNK : 10 * CHUNK] = b"\x01" * CHUNK
    expect[5 * CHUNK : 5 * CHUNK + 50] = b"\x02" * 50
    assert pool.free_chunks == free + 2
    pool.create_snapshot("v", "again")  # the layer below works as a head in every way
    dev.write(11 * CHUNK, b"\x03" * CHUNK)
    snap = SnapshotDevice(pool, pool.snapshot("v", "again"))
    assert snap.read(0, CHUNKS * CHUNK) == bytes(expect)
    expect[11 * CHUNK : 12 * CHUNK] = b"\x03" * CHUNK
    report = pool.check()
    assert report["ok"], report["problems"]
    pool.close()
    reopened = Pool(tmp_path / "pool")
    assert VolumeDevice(reopened, reopened.volume("v")).read(0, CHUNKS * CHUNK) == bytes(expect)
    report = reopened.check()
    assert report["ok"], report["problems"]
    reopened.close()


def test_a_head_bigger_than_the_snapshot_still_takes_the_snapshot_in(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    pool.create_volume("v", CHUNKS * CHUNK)
    dev = VolumeDevice(pool, pool.volume("v"))
    dev.write(0, b"\x05" * CHUNK)
    pool.create_snapshot("v", "small")
    expect = _fill(dev)
    pool.flush()
    changes = pool.db.total_changes
    pool.delete_snapshot("v", "small")
    assert pool.db.total_changes - changes < 20
    assert dev.read(0, CHUNKS * CHUNK) == bytes(expect)
    report = pool.check()
    assert report["ok"], report["problems"]
    pool.close()
