"""Adversarial: a synchronous flush (or wait for a wipe) on the loop thread right after a
job was started there, before the job's task ever ran, must not wait forever."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from virtua.storage import pool as pool_mod
from virtua.storage.pool import Pool
from virtua.storage.volume import VolumeDevice

CHUNK = 4096


def _run_bounded(body: Callable[[], None], timeout: float = 20) -> None:
    errors: list[BaseException] = []

    async def main() -> None:
        body()

    def thread() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=thread, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the loop thread waits forever for a job whose task never ran"
    if errors:
        raise errors[0]


def test_a_fua_write_that_starts_an_automatic_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_mod, "AUTO_COMMIT_ROWS", 8)
    pool = Pool.create(tmp_path / "pool", "p", capacity=256 * CHUNK, chunk_size=CHUNK)
    pool.create_volume("v", 64 * CHUNK)
    dev = VolumeDevice(pool, pool.volume("v"))

    def body() -> None:
        for c in range(7):
            dev.write(c * CHUNK, b"\x01" * CHUNK)
        dev.write(7 * CHUNK, b"\x02" * CHUNK, fua=True)  # its row starts the commit job, then FUA flushes

    _run_bounded(body)
    assert dev.read(7 * CHUNK, CHUNK) == b"\x02" * CHUNK
    pool.close()


def test_a_removal_that_starts_a_wipe_then_a_close(tmp_path: Path) -> None:
    pool = Pool.create(tmp_path / "pool", "p", capacity=1024 * CHUNK, chunk_size=CHUNK)
    pool.create_volume("big", 512 * CHUNK)
    dev = VolumeDevice(pool, pool.volume("big"))
    dev.write(0, b"\x03" * (512 * CHUNK))
    pool.flush()

    def body() -> None:
        pool.delete_volume("big")  # 512 chunks to wipe: a job in a thread, beside the loop
        pool.close()  # waits for it

    _run_bounded(body)
