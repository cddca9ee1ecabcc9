"""nbdinfo, nbdcopy and libnbd (Python bindings, system interpreter) against virtua."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

pytestmark = pytest.mark.interop


def test_nbdinfo_list_and_json(nbd_server, sh):
    srv = nbd_server()
    out = sh(["nbdinfo", "--list", f"nbd://127.0.0.1:{srv.port}"]).stdout
    assert 'export="disk.img"' in out and 'export="disk@ro"' in out
    j = json.loads(sh(["nbdinfo", "--json", srv.uri()]).stdout)
    assert j["protocol"] == "newstyle-fixed"
    assert j["TLS"] is False
    exp = j["exports"][0]
    assert exp["export-name"] == "disk.img"
    assert exp["export-size"] == 64 * 1024 * 1024
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_maximum"] == 32 * 1024 * 1024
    assert "base:allocation" in exp["contexts"]
    assert exp["can_multi_conn"] is True and exp["is_read_only"] is False
    j = json.loads(sh(["nbdinfo", "--json", "--list", f"nbd://127.0.0.1:{srv.port}"]).stdout)
    assert sorted(e["export-name"] for e in j["exports"]) == ["disk.img", "disk@ro"]


@pytest.mark.parametrize(
    "export,yes,no",
    [
        (
            "disk.img",
            ["connect", "read", "write", "flush", "fua", "trim", "zero", "fast-zero", "df",
             "multi-conn", "cache", "structured-reply"],
            [],
        ),
        ("disk@ro", ["connect", "read", "flush", "multi-conn", "cache", "df"],
         ["write", "trim", "zero", "fast-zero", "fua"]),
    ],
)
def test_nbdinfo_can(nbd_server, sh, export, yes, no):
    srv = nbd_server(unix=False)
    uri = srv.uri(export)
    for feat in yes:
        assert sh(["nbdinfo", "--can", feat, uri], check=False).returncode == 0, feat
    for feat in no:
        assert sh(["nbdinfo", "--can", feat, uri], check=False).returncode == 2, feat
    # (nbdinfo 1.14 has no --has; the contexts are in its normal output)
    assert "base:allocation" in sh(["nbdinfo", uri]).stdout
    ro = sh(["nbdinfo", "--is", "read-only", uri], check=False).returncode
    assert ro == (0 if export == "disk@ro" else 2)
    assert sh(["nbdinfo", "--is", "tls", uri], check=False).returncode == 2


def test_nbdinfo_map_matches_writes(nbd_server, sh):
    srv = nbd_server()
    mib = 1024 * 1024
    sh(["qemu-io", "-f", "raw", "-c", "write -P 1 1M 1M", "-c", "write -P 2 10M 64k",
        "-c", "write -P 3 63M 1M", srv.uri()])
    out = json.loads(sh(["nbdinfo", "--map", "--json", srv.uri()]).stdout)
    data = [(e["offset"], e["length"]) for e in out if e["type"] == 0]
    holes = [(e["offset"], e["length"]) for e in out if e["type"] == 3]
    assert data == [(1 * mib, mib), (10 * mib, 65536), (63 * mib, mib)]
    assert holes == [(0, mib), (2 * mib, 8 * mib), (10 * mib + 65536, 53 * mib - 65536)]
    total = sh(["nbdinfo", "--map", "--totals", srv.uri()]).stdout
    assert "data" in total and "hole,zero" in total


def test_nbdcopy_both_ways_multi_conn(nbd_server, sh, tmp_path):
    srv = nbd_server()
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        for i in range(0, 64, 3):
            f.seek(i * 1024 * 1024 + 512 * i)
            f.write(os.urandom(500_000))
    sh(["nbdcopy", "--connections=4", "--requests=16", str(src), srv.uri()])
    dst = tmp_path / "dst.img"
    sh(["nbdcopy", "--connections=4", str(srv.uri()), str(dst)])
    assert src.read_bytes() == dst.read_bytes()
    dst2 = tmp_path / "dst2.img"
    sh(["nbdcopy", "--connections=4", "--destination-is-zero", srv.unix_uri(), str(dst2)])
    assert src.read_bytes() == dst2.read_bytes()
    # sparse copy back: nbdcopy zeroes the holes with WRITE_ZEROES
    sh(["nbdcopy", "--connections=2", str(dst), srv.uri()])
    sh(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri()])


LIBNBD_SCRIPT = textwrap.dedent(
    r"""
    import errno, sys, nbd
    uri, ro_uri = sys.argv[1], sys.argv[2]
    MiB = 1024 * 1024

    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    assert h.get_structured_replies_negotiated()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    size = h.get_size()
    assert size == 64 * MiB

    # write with FUA, read back
    h.pwrite(b"\x07" * 65536, 2 * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(65536, 2 * MiB) == b"\x07" * 65536

    # structured read: data and hole chunks
    chunks = []
    def chunk(subbuf, offset, status, err):
        chunks.append((status, offset, len(subbuf)))
        return 0
    buf = h.pread_structured(4 * MiB, 0, chunk)
    assert buf[2 * MiB:2 * MiB + 65536] == b"\x07" * 65536 and buf[:2 * MiB] == bytes(2 * MiB)
    kinds = {c[0] for c in chunks}
    assert nbd.READ_HOLE in kinds and nbd.READ_DATA in kinds, chunks
    # DF: a single data chunk
    chunks.clear()
    h.pread_structured(131072, 2 * MiB - 32768, chunk, nbd.CMD_FLAG_DF)
    assert [c[0] for c in chunks] == [nbd.READ_DATA], chunks

    # block status
    ents = []
    def extent(meta, offset, entries, err):
        ents.append((meta, list(entries)))
        return 0
    h.block_status(4 * MiB, 0, extent)
    meta, e = ents[0]
    assert meta == nbd.CONTEXT_BASE_ALLOCATION
    pairs = list(zip(e[0::2], e[1::2]))
    assert pairs[0] == (2 * MiB, 3) and pairs[1] == (65536, 0), pairs
    ents.clear()
    h.block_status(4 * MiB, 0, extent, nbd.CMD_FLAG_REQ_ONE)
    assert len(ents[0][1]) == 2

    # trim and zeroes
    h.trim(65536, 2 * MiB)
    assert h.pread(65536, 2 * MiB) == bytes(65536)
    h.pwrite(b"\x09" * 8192, 3 * MiB)
    h.zero(4096, 3 * MiB + 1024, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    assert h.pread(8192, 3 * MiB) == b"\x09" * 1024 + bytes(4096) + b"\x09" * 3072
    h.zero(8192, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    try:
        h.zero(8192, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        raise SystemExit("fast zero with NO_HOLE should fail")
    except nbd.Error as ex:
        assert ex.errnum == errno.ENOTSUP, ex
    h.cache(MiB, 0)
    h.flush()

    # out of range
    h.set_strict_mode(0)  # let requests reach the server instead of libnbd's own checks
    for fn, want in (
        (lambda: h.pread(4096, size - 1024), errno.EINVAL),
        (lambda: h.pwrite(b"x" * 4096, size - 1024), errno.ENOSPC),
        (lambda: h.trim(4096, size), errno.ENOSPC),
        (lambda: h.zero(4096, size), errno.ENOSPC),
        (lambda: h.block_status(4096, size, extent), errno.EINVAL),
        (lambda: h.pread(4096, 0, 0x40), errno.EINVAL),
    ):
        try:
            fn()
            raise SystemExit(f"expected errno {want}")
        except nbd.Error as ex:
            assert ex.errnum == want, (ex, want)
    assert h.pread(1, 0) == b"\0"  # connection still fine
    h.shutdown()

    # read-only export: EPERM
    r = nbd.NBD()
    r.connect_uri(ro_uri)
    assert r.is_read_only()
    assert r.pread(4, 0) == b"\xa5" * 4
    r.set_strict_mode(0)
    for fn in (lambda: r.pwrite(b"x" * 512, 0), lambda: r.trim(512, 0), lambda: r.zero(512, 0)):
        try:
            fn()
            raise SystemExit("write to read-only export succeeded")
        except nbd.Error as ex:
            assert ex.errnum == errno.EPERM, ex
    r.shutdown()

    # no structured replies: simple replies, errors still carry the handle
    s = nbd.NBD()
    s.set_request_structured_replies(False)
    s.connect_uri(uri)
    assert not s.get_structured_replies_negotiated()
    s.pwrite(b"\x0b" * 65536, 5 * MiB)
    assert s.pread(65536, 5 * MiB) == b"\x0b" * 65536
    s.set_strict_mode(0)
    try:
        s.pread(10, size - 5)
        raise SystemExit("expected EINVAL")
    except nbd.Error as ex:
        assert ex.errnum == errno.EINVAL
    assert s.pread(2, 5 * MiB) == b"\x0b\x0b"
    s.shutdown()

    # many requests in flight on one connection (async API)
    a = nbd.NBD()
    a.connect_uri(uri)
    bufs = [nbd.Buffer(4096) for _ in range(64)]
    for i in range(64):
        a.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 4096), 8 * MiB + i * 4096)
    while a.aio_in_flight() > 0:
        a.poll(-1)
    for i in range(64):
        a.aio_pread(bufs[i], 8 * MiB + i * 4096)
    while a.aio_in_flight() > 0:
        a.poll(-1)
    for i in range(64):
        assert bufs[i].to_bytearray() == bytearray([i]) * 4096
    a.shutdown()
    print("LIBNBD-OK")
    """
)


def test_libnbd_python(nbd_server, sh, tmp_path):
    srv = nbd_server("--sparse-reads", "on")
    script = tmp_path / "libnbd_check.py"
    script.write_text(LIBNBD_SCRIPT)
    p = sh(["/usr/bin/python3", str(script), srv.uri(), srv.uri("disk@ro")], check=False)
    assert p.returncode == 0 and "LIBNBD-OK" in p.stdout, p.stdout + p.stderr


def test_nbdsh_unix_socket(nbd_server, sh):
    srv = nbd_server()
    # nbdsh runs `python3` from PATH; libnbd's bindings live in the system interpreter
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    p = sh(["nbdsh", "-u", srv.unix_uri(), "-c",
            "h.pwrite(b'unix!', 100); assert h.pread(5, 100) == b'unix!'; print(h.get_size())"],
           env=env)
    assert p.stdout.strip() == str(64 * 1024 * 1024)
