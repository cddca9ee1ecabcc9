"""Large writes handed to worker threads (virtua.nbd.bulk, storage.inflight): the data,
the block map, FLUSH and copy-on-write stay right when the pwrite leaves the loop.

A real server (in-process, uvloop) exporting storage-engine volumes, real sockets."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtua.nbd import proto as P
from virtua.nbd.client import NBDClient
from virtua.nbd.server import _BULK_WRITE_MIN
from virtua.nbd.testing import ServerThread
from virtua.nbd.tls import TLSConfig
from virtua.nbd.volumes import StorageExports
from virtua.storage.service import Storage
from virtua.storage.volume import VolumeDevice

MiB = 1 << 20
CHUNK = 64 * 1024


class Served:
    def __init__(self, tmp: Path, **server_kwargs: object) -> None:
        self.home = tmp / "home"
        self.storage = Storage(self.home)
        self.storage.create_pool("p", capacity=256 * MiB)
        pool = self.storage.pool("p")
        pool.create_volume("v", 32 * MiB)
        pool.create_volume("t", 8 * MiB)
        self.template = os.urandom(8 * MiB)
        VolumeDevice(pool, pool.volume("t")).write(0, self.template)
        pool.create_snapshot("t", "s")
        pool.clone("t", "s", "c")
        pool.flush()
        self.pool = pool
        self.st = ServerThread(StorageExports(self.storage, {}), **server_kwargs).start()

    def client(self, name: str = "p/v", **kw: object) -> NBDClient:
        assert self.st.port is not None
        return NBDClient.connect("127.0.0.1", self.st.port).open(name, **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.st.stop()
        self.storage.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.stop()


def test_large_writes_bypass_the_loop(served: Served) -> None:
    """The writes below do go through the workers (else this file tests nothing new)."""
    used = []
    orig = served.pool.inflight.add

    def spy(plan):  # type: ignore[no-untyped-def]
        used.append(len(plan.data))
        return orig(plan)

    served.pool.inflight.add = spy  # type: ignore[method-assign]
    c = served.client()
    c.write(3, os.urandom(MiB))
    c.write(8 * MiB, os.urandom(_BULK_WRITE_MIN - 1))  # below the mark: inline
    c.disconnect()
    assert used == [MiB]


def test_pipelined_writes_read_back_on_another_connection_and_after_reopen(served: Served, tmp_path: Path) -> None:
    """Large unaligned writes (new chunks, partial chunks, overwrites) pipelined with small
    ones and reads, all sent before any reply is read; then read back elsewhere, and from
    the pool as committed once the server is gone (the rows match the data)."""
    c = served.client()
    expect = bytearray(32 * MiB)
    writes = [
        (5, os.urandom(MiB + 3)),
        (MiB + 100, os.urandom(4096)),
        (2 * MiB + 1, os.urandom(700_000)),
        (4 * MiB - 7, os.urandom(3 * MiB + 11)),
        (4 * MiB + 10, os.urandom(2 * MiB)),  # overlaps the one before, sent after it
        (20 * MiB, os.urandom(32 * MiB - 20 * MiB)),  # up to the end of the export
        (9 * MiB + 8, os.urandom(300_000)),
    ]
    handles = []
    for off, data in writes:
        handles.append(c.send_request(P.CMD_WRITE, off, len(data), 0, data))
    for _ in writes:
        r = c.recv_reply()
        assert r.error == 0
    # overlapping writes sent without waiting may land in any order (NBD): the rest must match
    for off, data in writes:
        if off != 4 * MiB - 7 and off != 4 * MiB + 10:
            expect[off : off + len(data)] = data
    other = served.client()
    for off, data in writes:
        if off not in (4 * MiB - 7, 4 * MiB + 10):
            assert other.read(off, len(data)) == data
    a, b = writes[3][1], writes[4][1]
    got = other.read(4 * MiB - 7, len(a))
    assert got[:17] == a[:17] and got[17 + 2 * MiB :] == a[17 + 2 * MiB :]
    assert got[17 : 17 + 2 * MiB] in (b, a[17 : 17 + 2 * MiB])
    expect[4 * MiB - 7 : 4 * MiB - 7 + len(a)] = got
    other.flush()
    c.disconnect()
    other.disconnect()
    served.stop()
    storage = Storage(served.home)
    try:
        pool = storage.pool("p")
        assert VolumeDevice(pool, pool.volume("v")).read(0, 32 * MiB) == bytes(expect)
    finally:
        storage.close()
    served.storage = Storage(served.home)  # for the fixture's stop()
    served.st = ServerThread(StorageExports(served.storage, {})).start()


def test_concurrent_large_writes_and_flush_on_two_connections(served: Served) -> None:
    """Two clients write 1 MiB pieces to fresh chunks at once, each then FLUSHes: once a
    FLUSH is answered, every write acknowledged before it was sent, on either
    connection, is written and its rows committed (multi-conn: one device, one pool)."""
    pieces = {i: os.urandom(MiB) for i in range(24)}
    errors: list[BaseException] = []
    acked: dict[int, set[int]] = {0: set(), 1: set()}

    def writer(k: int) -> None:
        try:
            c = served.client()
            for i in range(k, 24, 2):
                c.write(i * MiB, pieces[i])
                acked[k].add(i)
                if i % 6 == k:
                    before = set(acked[0]) | set(acked[1])
                    c.flush()
                    state = served.st.call(lambda: (len(served.pool.inflight.plans), dict(served.pool._pending)))
                    layer = served.pool.volume("v").layer
                    chunks = {(layer, (j * MiB) // CHUNK + m) for j in before for m in range(MiB // CHUNK)}
                    assert not chunks & set(state[1]), "rows of acknowledged writes not committed by FLUSH"
            c.disconnect()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    c = served.client()
    for i, data in pieces.items():
        assert c.read(i * MiB, MiB) == data
    c.disconnect()


def test_large_write_to_a_clone_copies_shared_chunks_on_write(served: Served) -> None:
    """Unaligned at both ends: the clone's first and last chunk keep the template's bytes
    around the write; the template's snapshot is unchanged."""
    c = served.client("p/c")
    off, data = 3 * CHUNK + 1000, os.urandom(MiB + 5000)
    c.write(off, data)
    got = c.read(0, 8 * MiB)
    want = bytearray(served.template)
    want[off : off + len(data)] = data
    assert got == bytes(want)
    c.flush()
    c.disconnect()
    snap = served.client("p/t@s")
    assert snap.read(0, 8 * MiB) == served.template
    snap.disconnect()
    pool = served.pool
    clone_map = served.st.call(lambda: pool.volume_map(pool.volume("c")))
    owned = served.st.call(
        lambda: sum(1 for ch in range(8 * MiB // CHUNK) if clone_map.get(ch) > 0
                    and pool.owner[clone_map.get(ch)] == pool.volume("c").layer)
    )
    assert owned == (off + len(data) - 1) // CHUNK - off // CHUNK + 1


def test_write_error_is_answered(served: Served) -> None:
    """A write the device refuses at planning (beyond the end) gets its error, and the
    connection stays in sync for the next request."""
    c = served.client()
    h = c.send_request(P.CMD_WRITE, 32 * MiB - 4096, MiB, 0, os.urandom(MiB))
    r = c.recv_reply()
    assert r.handle == h and r.error == P.NBD_ENOSPC
    c.write(0, b"x" * MiB)
    assert c.read(0, MiB) == b"x" * MiB
    c.disconnect()


def test_tls_large_writes_and_reads(tmp_path: Path) -> None:
    """TLS connections keep the inline path (no sendfile, no raw socket writes) and work."""
    from virtua.pki.ca import ClusterCA
    from virtua.pki.credentials import MANAGER, Credentials
    from virtua.pki.files import write_private

    ca = ClusterCA.ensure(tmp_path / "pki", manager_sans=["127.0.0.1"])
    m = ca.manager
    s = Served(tmp_path, tls=TLSConfig(str(m.cert), str(m.key), str(m.ca)), tls_mode="require")
    try:
        cert, key = ca.issue("host", "h1", ["127.0.0.1"])
        creds = Credentials(tmp_path / "creds")
        creds.dir.mkdir(mode=0o700)
        write_private(creds.ca, ca.ca_pem)
        write_private(creds.cert, cert)
        write_private(creds.key, key)
        ctx = creds.client_context(MANAGER)
        assert s.st.port is not None
        c = NBDClient.connect("127.0.0.1", s.st.port)
        c.hello()
        c.starttls(ctx, server_hostname="127.0.0.1")
        c.structured_reply()
        c.go("p/v")
        pieces = [(i * MiB + 7, os.urandom(MiB)) for i in range(6)]
        for off, data in pieces:
            c.send_request(P.CMD_WRITE, off, len(data), 0, data)
        for _ in pieces:
            assert c.recv_reply().error == 0
        c.flush()
        for off, data in pieces:
            assert c.read(off, len(data)) == data
        c.disconnect()
    finally:
        s.stop()


def test_pool_flush_ends_writes_in_flight(tmp_path: Path) -> None:
    """Pool.flush() (every admin operation's first step) waits for a write a worker is
    executing and records its rows: no snapshot or delete runs beside it."""
    storage = Storage(tmp_path / "home")
    try:
        storage.create_pool("p", capacity=64 * MiB)
        pool = storage.pool("p")
        pool.create_volume("v", 8 * MiB)
        dev = VolumeDevice(pool, pool.volume("v"))
        data = os.urandom(MiB)
        plan = dev.start_write(CHUNK, memoryview(data))
        t = threading.Timer(0.2, plan.execute)
        t.start()
        pool.flush()
        assert plan.done.is_set() and plan.ended and not pool.inflight.plans
        assert not pool._pending
        pool.create_snapshot("v", "s")
        assert dev.read(CHUNK, MiB) == data
        t.join()
    finally:
        storage.close()


def test_large_reads_pipelined_with_other_requests_keep_replies_whole(served: Served) -> None:
    """Large reads (writev from the file's mapping, or the copy path when the socket is
    full) pipelined with small reads, writes a worker executes, small writes and FLUSHes,
    on a simple-reply and a structured connection: every reply is whole and carries its
    request's data (a reply never mixes with another's bytes)."""
    data = os.urandom(16 * MiB)
    w = served.client()
    for off in range(0, 16 * MiB, 4 * MiB):
        w.write(off, data[off : off + 4 * MiB])
    w.disconnect()
    for structured in (False, True):
        c = served.client(structured=structured, meta=False)
        want: dict[int, bytes | None] = {}
        for i in range(40):
            off = (i * 397 * 1024) % (15 * MiB)
            if i % 5 == 4:
                want[c.send_request(P.CMD_FLUSH)] = None
            elif i % 5 == 3:  # rewrites what is there: the reads' data stay the same
                n = MiB if i % 2 else 4096
                want[c.send_request(P.CMD_WRITE, off, n, 0, data[off : off + n])] = None
            else:
                n = MiB + i if i % 2 else 4096
                want[c.send_request(P.CMD_READ, off, n)] = data[off : off + n]
        for _ in range(len(want)):
            r = c.recv_reply()
            assert r.error == 0
            expect = want.pop(r.handle)
            if expect is not None:
                assert r.data == expect
        c.disconnect()


def test_large_reads_to_a_client_that_reads_slowly(served: Served) -> None:
    """A client that reads nothing for a while: replies that do not fit in the socket are
    queued in the transport, and all of them arrive whole and in order."""
    import time

    data = os.urandom(8 * MiB)
    c = served.client(structured=False)
    c.write(0, data)
    handles = [c.send_request(P.CMD_READ, i * MiB, MiB) for i in range(8)]
    time.sleep(0.3)
    got = {}
    for _ in handles:
        r = c.recv_reply()
        assert r.error == 0
        got[r.handle] = r.data
    assert [got[h] for h in handles] == [data[i * MiB : (i + 1) * MiB] for i in range(8)]
    c.disconnect()


def test_flush_sent_behind_a_large_write_waits_for_it(served: Served) -> None:
    """WRITE and FLUSH pipelined: the FLUSH arrives while a worker still has the write, and
    is answered after it, with its rows committed (the server covers writes in flight
    when a FLUSH arrives, not only those already acknowledged)."""
    c = served.client()
    data = os.urandom(2 * MiB)
    hw = c.send_request(P.CMD_WRITE, 5 * MiB, len(data), 0, data)
    hf = c.send_request(P.CMD_FLUSH)
    first, second = c.recv_reply(), c.recv_reply()
    assert (first.handle, second.handle) == (hw, hf) and first.error == second.error == 0
    pending = served.st.call(lambda: dict(served.pool._pending))
    layer = served.pool.volume("v").layer
    assert not {(layer, 5 * MiB // CHUNK + i) for i in range(2 * MiB // CHUNK)} & set(pending)
    assert c.read(5 * MiB, len(data)) == data
    c.disconnect()
