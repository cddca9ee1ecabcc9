"""No volume ever reads another volume's data, whatever crashed when: the server killed
with unflushed writes in its page cache, a chunk freed and reused, a failed copy, a hole
punch the file system refuses. And the space of data nobody committed comes back."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.crash_server import CrashServer
from virtua.nbd.client import NBDClient
from virtua.storage.pool import Pool
from virtua.storage.service import Storage
from virtua.storage.volume import VolumeDevice

KIB = 1024
SECRET = b"SECRET-OF-VICTIM"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    st = Storage(tmp_path / "home")
    st.create_pool("s", capacity=256 << 20)
    st.pool("s").create_volume("victim", 1 << 20)
    st.pool("s").create_volume("other", 1 << 20)
    st.close()
    return tmp_path / "home"


@pytest.fixture
def server(home: Path) -> Iterator[CrashServer]:
    srv = CrashServer(home).start()
    yield srv
    srv.kill()


def connect(srv: CrashServer, export: str) -> NBDClient:
    return NBDClient.connect(port=srv.port).open(export)


def data_file_bytes(home: Path) -> int:
    """What the pool's data file occupies on disk (du), not its apparent size."""
    return os.stat(home / "pools" / "s" / "data").st_blocks * 512


def test_unflushed_writes_of_a_killed_server_never_show_in_another_volume(server: CrashServer) -> None:
    victim = connect(server, "s/victim")
    victim.write(0, SECRET * (256 * KIB // len(SECRET)))  # acknowledged, never flushed
    server.kill()
    server.start()
    other = connect(server, "s/other")
    for chunk in range(4):
        other.write(chunk * 64 * KIB, b"O" * 4 * KIB)
    other.flush()
    got = other.read(0, 256 * KIB)
    assert SECRET not in got, "s/other reads s/victim's unflushed data"
    for chunk in range(4):
        part = got[chunk * 64 * KIB : (chunk + 1) * 64 * KIB]
        assert part == b"O" * 4 * KIB + bytes(60 * KIB), f"chunk {chunk} of s/other"
    # the victim's own unflushed write may be there or not, but nothing else
    mine = connect(server, "s/victim").read(0, 256 * KIB)
    assert mine in (SECRET * (256 * KIB // len(SECRET)), bytes(256 * KIB))


def test_space_of_a_killed_import_comes_back(server: CrashServer, home: Path) -> None:
    importer = connect(server, "s/victim")
    block = os.urandom(64 * KIB)
    for i in range(16):  # 1 MiB written and acknowledged, never flushed
        importer.write(i * 64 * KIB, block)
    server.kill()
    server.start()
    report = server.call("pool.check", name="s")
    assert report["ok"], report["problems"]
    used = server.call("pool.info", name="s")["used"]
    assert data_file_bytes(home) <= used + 64 * KIB, (
        f"the data file holds {data_file_bytes(home)} bytes, volumes use {used}"
    )
    server.call("volume.rm", ref="s/victim")
    server.kill()
    server.start()
    assert data_file_bytes(home) <= 64 * KIB


@pytest.mark.parametrize("fails", ["sync", "copy"])
def test_a_failed_flatten_leaves_no_copied_data_in_free_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    pool = Pool.create(tmp_path / "p", "p", capacity=64 << 20, chunk_size=4096)
    base = VolumeDevice(pool, pool.create_volume("base", 64 * 4096))
    base.write(0, SECRET * (64 * 4096 // len(SECRET)))
    pool.clone("base", None, "child")
    import virtua.storage.pool as pool_mod

    real_copy = pool_mod._copy
    copies = 0

    def failing_copy(fd: int, src: int, dst: int, length: int) -> None:  # a slice's copy, half done
        nonlocal copies
        copies += 1
        if copies == 40:
            raise OSError(5, "Input/output error")
        real_copy(fd, src, dst, length)

    def failing_fdatasync(fd: int) -> None:  # the flush after the copies
        raise OSError(5, "Input/output error")

    if fails == "copy":
        monkeypatch.setattr(pool_mod, "_copy", failing_copy)
    else:
        monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    with pytest.raises(OSError):
        pool.flatten("child")
    monkeypatch.undo()
    assert not pool.busy
    fresh = VolumeDevice(pool, pool.create_volume("fresh", 64 * 4096))
    fresh.write(0, b"F")  # takes chunks from the free list: each must read as zeros
    for i in range(1, 64):
        fresh.write(i * 4096, b"F")
    got = fresh.read(0, 64 * 4096)
    assert SECRET not in got
    # the clone reads what it did (copies mapped before the failure are its own now)
    assert VolumeDevice(pool, pool.volume("child")).read(0, 64 * 4096) == base.read(0, 64 * 4096)
    assert pool.check()["ok"], pool.check()["problems"]
    pool.flatten("child")  # and a second try finishes the job
    assert pool.volume("child").origin is None
    assert pool.check()["ok"]
    pool.close()


def test_a_removal_cut_short_by_a_crash_is_finished_on_open(tmp_path: Path) -> None:
    pool = Pool.create(tmp_path / "p", "p", capacity=64 << 20, chunk_size=4096)
    dev = VolumeDevice(pool, pool.create_volume("gone", 64 * 4096))
    dev.write(0, SECRET * (64 * 4096 // len(SECRET)))
    pool.create_snapshot("gone", "s1")
    dev.write(0, b"x" * 4096)
    pool.close()
    # what delete_volume's first transaction leaves when the process dies after it
    pool = Pool(tmp_path / "p")
    pool.db.execute("DELETE FROM snapshots")
    pool.db.execute("DELETE FROM volumes")
    pool.close()
    pool = Pool(tmp_path / "p")
    report = pool.check()
    assert report["ok"], report["problems"]
    assert report["layers"] == 0 and report["chunks_allocated"] == 0
    assert report["file_bytes"] == 0
    pool.close()


def test_a_flatten_in_serve_lets_writes_and_reads_in_between(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flatten_async copies in slices: the guest's writes in between win over the copies,
    and no admin operation may change the volume's layers until it is done."""
    import asyncio

    import virtua.storage.pool as pool_mod
    from virtua.errors import Busy

    monkeypatch.setattr(pool_mod, "FLATTEN_SLICE", 8 * 4096)
    pool = Pool.create(tmp_path / "p", "p", capacity=64 << 20, chunk_size=4096)
    n = 256
    base = VolumeDevice(pool, pool.create_volume("base", n * 4096))
    for i in range(n):
        base.write(i * 4096, bytes([i % 251 + 1]) * 4096)
    pool.clone("base", None, "child")
    child = VolumeDevice(pool, pool.volume("child"))
    want = bytearray(base.read(0, n * 4096))

    async def main() -> int:
        task = asyncio.create_task(pool.flatten_async("child"))
        await asyncio.sleep(0)
        assert pool.busy
        for what in (lambda: pool.delete_volume("child"), lambda: pool.create_snapshot("child", "s"),
                     lambda: pool.reset("child"), lambda: pool.flatten("child"),
                     lambda: pool.delete_volume("base", recursive=True)):
            with pytest.raises(Busy, match="being flattened"):
                what()
        i = 0
        while not task.done():
            off = (i * 37 % n) * 4096 + 100
            child.write(off, b"W" * 50)
            want[off : off + 50] = b"W" * 50
            if i % 5 == 0:
                z = (i * 11 % n) * 4096
                child.write_zeroes(z, 4096)
                want[z : z + 4096] = bytes(4096)
            assert child.read(0, n * 4096) == want
            i += 1
            await asyncio.sleep(0)
        assert i > 3, "the flatten ran in one go"
        return await task

    copied = asyncio.run(main())
    assert 0 < copied <= n * 4096
    assert not pool.busy
    assert pool.volume("child").origin is None
    assert child.read(0, n * 4096) == want
    pool.delete_volume("base", recursive=True)
    assert child.read(0, n * 4096) == want
    assert pool.check()["ok"], pool.check()["problems"]
    pool.close()
    pool = Pool(tmp_path / "p")
    assert VolumeDevice(pool, pool.volume("child")).read(0, n * 4096) == want
    assert pool.check()["ok"]
    pool.close()
