"""`pool check` accounts for every allocated byte of the data file, and `--repair` wipes
what no volume owns: data past the high-water mark (what a killed import leaves), data in
free chunks, freed chunks whose wipe failed."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import virtua.storage.pool as pool_module
from tests.cli_support import free_port
from virtua.nbd.client import NBDClient
from virtua.storage.pool import Pool
from virtua.storage.volume import VolumeDevice

CHUNK = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]


def written_pool(path: Path) -> tuple[Pool, VolumeDevice]:
    pool = Pool.create(path, "p", capacity=64 << 20, chunk_size=CHUNK)
    dev = VolumeDevice(pool, pool.create_volume("v", 16 * CHUNK))
    dev.write(0, b"v" * (4 * CHUNK))  # chunks 1..4
    dev.flush()
    return pool, dev


def test_check_finds_leaked_and_unreferenced_bytes_and_repair_wipes_them(tmp_path: Path) -> None:
    pool, dev = written_pool(tmp_path / "p")
    dev.discard(3 * CHUNK, CHUNK)  # frees chunk 4: wiped at the flush
    dev.flush()
    clean = pool.check()
    assert clean["ok"], clean["problems"]
    assert clean["referenced_bytes"] == 3 * CHUNK
    assert clean["file_bytes"] == 3 * CHUNK
    # what a crash or a killed import leaves: data no committed row names
    os.pwrite(pool.data_fd, b"L" * CHUNK, (pool.hwm + 2) * CHUNK)  # past the high-water mark
    os.pwrite(pool.data_fd, b"U" * 4096, 4 * CHUNK)  # in the free chunk 4
    report = pool.check()
    assert not report["ok"]
    assert report["leaked_bytes"] == CHUNK
    assert report["unreferenced_bytes"] == 4096
    assert report["referenced_bytes"] == 3 * CHUNK
    assert any("65536 bytes in 1 chunk(s) past the high-water mark" in p for p in report["problems"])
    assert any("4096 bytes in 1 chunk(s) in free chunks" in p for p in report["problems"])
    fixed = pool.check(repair=True)
    assert fixed["ok"], fixed["problems"]
    assert fixed["repaired_bytes"] == CHUNK + 4096
    after = pool.check()
    assert after["ok"] and after["leaked_bytes"] == after["unreferenced_bytes"] == 0
    assert after["file_bytes"] == 3 * CHUNK
    # the wiped free chunk is handed out again and reads as zeros
    dev.write(10 * CHUNK, b"n")
    assert dev.read(10 * CHUNK, CHUNK) == b"n" + bytes(CHUNK - 1)
    pool.close()


def test_a_freed_chunk_whose_wipe_fails_is_never_reused_until_wiped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, dev = written_pool(tmp_path / "p")

    def broken_punch(fd: int, offset: int, length: int) -> bool:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(pool_module, "punch_hole", broken_punch)
    dev.discard(0, CHUNK)  # chunk 1 holds b"v"... and cannot be wiped now
    dev.flush()
    report = pool.check()
    assert not report["ok"]
    assert report["stale_bytes"] == CHUNK
    assert any("waiting to be wiped" in p for p in report["problems"])
    other = VolumeDevice(pool, pool.create_volume("other", 16 * CHUNK))
    for i in range(8):
        other.write(i * CHUNK, b"o")
    got = other.read(0, 8 * CHUNK)
    assert b"vvvv" not in got, "a chunk that still holds v's data was handed to another volume"
    monkeypatch.undo()
    fixed = pool.check(repair=True)
    assert fixed["ok"], fixed["problems"]
    assert pool.check()["stale_bytes"] == 0
    pool.close()



def test_cli_check_and_repair_through_virtua_serve(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200")
    cli = [sys.executable, "-m", "virtua.cli"]

    def virtua(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, cwd=ROOT)

    assert virtua("pool", "create", "s", "--capacity", "256M").returncode == 0
    assert virtua("volume", "create", "s/v", "--size", "4M").returncode == 0
    port = free_port()
    serve = subprocess.Popen(
        [*cli, "serve", "--no-agent", "--listen", f"127.0.0.1:{port}", "--api-listen", f"127.0.0.1:{free_port()}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert serve.stdout is not None
        assert serve.stdout.readline().startswith("VIRTUA_READY")
        c = NBDClient.connect(port=port).open("s/v")
        c.write(0, b"d" * (2 * CHUNK))
        c.flush()
        data = home / "pools" / "s" / "data"
        fd = os.open(data, os.O_WRONLY)
        os.pwrite(fd, b"L" * (8 * CHUNK), 10 * CHUNK)  # what a killed import leaves
        os.close(fd)
        r = virtua("pool", "check", "s", "--json")
        assert r.returncode == 1, r.stderr
        report = json.loads(r.stdout)
        assert report["leaked_bytes"] == 8 * CHUNK
        r = virtua("pool", "check", "s", "--repair", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["repaired_bytes"] == 8 * CHUNK
        assert os.stat(data).st_blocks * 512 == 2 * CHUNK
        assert c.read(0, 2 * CHUNK) == b"d" * (2 * CHUNK)
        c.disconnect()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=30)


def test_check_in_serve_scans_in_a_thread_beside_writes(tmp_path: Path) -> None:
    """check_async: the scan runs in a thread while the volumes go on being written,
    grown, trimmed and removed; none of that is reported as a problem, and a real leak
    still is."""
    import asyncio

    pool, dev = written_pool(tmp_path / "p")
    other = VolumeDevice(pool, pool.create_volume("o", 64 * CHUNK))

    async def main() -> list[dict]:
        reports = []
        for round_ in range(6):
            task = asyncio.create_task(pool.check_async())
            i = 0
            while not task.done():
                other.write((i % 64) * CHUNK, bytes([round_ + 1]) * CHUNK)  # new chunks, CoW
                if i % 3 == 0:
                    other.discard(((i + 7) % 64) * CHUNK, CHUNK)  # freed, not committed yet
                i += 1
                await asyncio.sleep(0)
            reports.append(await task)
        return reports

    for report in asyncio.run(main()):
        assert report["ok"], report["problems"]
    os.pwrite(pool.data_fd, b"L" * CHUNK, (pool.hwm + 2) * CHUNK)

    async def leak() -> dict:
        return await pool.check_async()

    report = asyncio.run(leak())
    assert not report["ok"] and report["leaked_bytes"] == CHUNK
    report = asyncio.run(pool.check_async(repair=True))
    assert report["repaired_bytes"] == CHUNK
    assert asyncio.run(leak())["ok"]
    pool.close()
