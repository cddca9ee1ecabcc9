"""Large writes through the worker threads (virtua.nbd.bulk), seen by other clients: what
qemu-io or nbdcopy (several connections, 1 MiB requests) write to a storage-engine
volume or a clone reads back the same through another client, and the clone's
template is untouched (copy-on-write through the new path)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import run
from virtua.nbd.testing import ServerThread
from virtua.nbd.volumes import StorageExports
from virtua.storage.service import Storage
from virtua.storage.volume import VolumeDevice

pytestmark = pytest.mark.interop
MiB = 1 << 20


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServerThread, bytes]]:
    storage = Storage(tmp_path / "home")
    storage.create_pool("p", capacity=256 * MiB)
    pool = storage.pool("p")
    pool.create_volume("v", 32 * MiB)
    pool.create_volume("t", 32 * MiB)
    template = os.urandom(32 * MiB)
    VolumeDevice(pool, pool.volume("t")).write(0, template)
    pool.create_snapshot("t", "s")
    pool.clone("t", "s", "c")
    pool.flush()
    st = ServerThread(StorageExports(storage, {})).start()
    yield st, template
    st.stop()
    storage.close()


def uri(st: ServerThread, export: str) -> str:
    return f"nbd://127.0.0.1:{st.port}/{export}"


def test_qemu_io_writes_nbdcopy_reads(served: tuple[ServerThread, bytes], tmp_path: Path) -> None:
    st, _ = served
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 4M", "-c", "write -P 0xa5 7340037 1M",
         "-c", "flush", uri(st, "p/v")])
    out = tmp_path / "v.raw"
    run(["nbdcopy", "--connections=4", "--request-size=1048576", uri(st, "p/v"), str(out)])
    want = bytearray(32 * MiB)
    want[MiB : 5 * MiB] = b"\x5a" * (4 * MiB)
    want[7340037 : 7340037 + MiB] = b"\xa5" * MiB
    assert out.read_bytes() == bytes(want)


def test_nbdcopy_writes_a_clone_on_four_connections(served: tuple[ServerThread, bytes], tmp_path: Path) -> None:
    """Every chunk of the clone is shared with the template when nbdcopy writes it in 1 MiB
    requests from 4 connections at once; qemu-img then compares through another client."""
    st, template = served
    src = tmp_path / "new.raw"
    new = bytearray(template)
    new[3 * MiB + 12345 : 20 * MiB + 777] = os.urandom(17 * MiB - 12345 + 777)
    src.write_bytes(bytes(new[: 24 * MiB]))  # the last 8 MiB stay the template's
    run(["nbdcopy", "--connections=4", "--request-size=1048576", "--flush", str(src), uri(st, "p/c")])
    full = tmp_path / "full.raw"
    full.write_bytes(bytes(new))
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(full), uri(st, "p/c")])
    orig = tmp_path / "template.raw"
    orig.write_bytes(template)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(orig), uri(st, "p/t@s")])
