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


def test_a_failed_flatten_leaves_no_copied_data_in_free_chunks(tmp_path: Path) -> None:
    pool = Pool.create(tmp_path / "p", "p", capacity=64 << 20, chunk_size=4096)
    base = VolumeDevice(pool, pool.create_volume("base", 64 * 4096))
    base.write(0, SECRET * (64 * 4096 // len(SECRET)))
    pool.clone("base", None, "child")
    real_fdatasync = os.fdatasync
    calls = 0

    def failing_fdatasync(fd: int) -> None:  # the flatten's own sync, after its copies
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(5, "Input/output error")
        real_fdatasync(fd)

    os.fdatasync = failing_fdatasync  # type: ignore[assignment]
    try:
        with pytest.raises(OSError):
            pool.flatten("child")
    finally:
        os.fdatasync = real_fdatasync
    fresh = VolumeDevice(pool, pool.create_volume("fresh", 64 * 4096))
    fresh.write(0, b"F")  # takes chunks from the free list: each must read as zeros
    for i in range(1, 64):
        fresh.write(i * 4096, b"F")
    got = fresh.read(0, 64 * 4096)
    assert SECRET not in got
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
