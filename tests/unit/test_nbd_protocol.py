"""The NBD server against a raw protocol client: handshake, commands, errors, limits."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from virtua.errors import NoSpace, ReadOnly
from virtua.nbd import proto as P
from virtua.nbd.client import NBDClient, NBDError, OptionError
from virtua.nbd.exports import DirectoryProvider
from virtua.nbd.server import NBDServer, nbd_errno
from virtua.nbd.testing import ServerThread
from virtua.nbd.tls import read_psk_file

SIZE = 8 * 1024 * 1024


@pytest.fixture
def export_dir(tmp_path) -> str:
    d = tmp_path / "exports"
    d.mkdir()
    with open(d / "disk.img", "wb") as f:
        f.truncate(SIZE)
    with open(d / "disk@snap", "wb") as f:
        f.write(b"\x5a" * 65536)
        f.truncate(SIZE)
    return str(d)


@pytest.fixture
def server(export_dir) -> Iterator[ServerThread]:
    provider = DirectoryProvider(export_dir)
    st = ServerThread(provider, sparse_reads=True, max_connections=8).start()
    yield st
    st.stop()
    provider.close()


def connect(st: ServerThread) -> NBDClient:
    assert st.port is not None
    return NBDClient.connect(port=st.port)


def opened(st: ServerThread, name: str = "disk.img", **kw) -> NBDClient:
    return connect(st).open(name, **kw)


def test_handshake_flags_and_list(server):
    c = connect(server)
    hflags = c.hello()
    assert hflags == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
    names = [n for n, _ in c.list_exports()]
    assert names == ["disk.img", "disk@snap"]
    c.option(P.OPT_ABORT)
    c.close()


def test_go_info_flags(server):
    c = connect(server)
    c.hello()
    c.structured_reply()
    info = c.go("disk.img", [P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE], opt=P.OPT_INFO)
    assert info[P.INFO_NAME] == b"disk.img"
    assert c.size == SIZE
    assert c.block_sizes == (1, 4096, 32 * 1024 * 1024)
    want = (
        P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_SEND_TRIM
        | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO | P.FLAG_SEND_CACHE
        | P.FLAG_CAN_MULTI_CONN | P.FLAG_SEND_DF
    )
    assert c.flags == want
    c.go("disk@snap")  # INFO did not end negotiation; GO does
    assert c.flags & P.FLAG_READ_ONLY
    assert not c.flags & P.FLAG_SEND_TRIM
    assert c.read(0, 4) == b"\x5a" * 4
    c.disconnect()


def test_unknown_export_and_unknown_option(server):
    c = connect(server)
    c.hello()
    with pytest.raises(OptionError) as ei:
        c.go("nope")
    assert ei.value.rep == P.REP_ERR_UNKNOWN
    with pytest.raises(OptionError) as ei:
        c.option(999, b"abc")
    assert ei.value.rep == P.REP_ERR_UNSUP
    with pytest.raises(OptionError) as ei:
        c.option(P.OPT_STARTTLS)  # no TLS configured
    assert ei.value.rep == P.REP_ERR_UNSUP
    with pytest.raises(OptionError) as ei:
        c.option(P.OPT_LIST, b"junk")
    assert ei.value.rep == P.REP_ERR_INVALID
    with pytest.raises(OptionError) as ei:  # meta context needs structured replies
        c.set_meta_context("disk.img", [P.BASE_ALLOCATION])
    assert ei.value.rep == P.REP_ERR_INVALID
    c.structured_reply()
    assert c.list_meta_context("disk.img", []) == [P.BASE_ALLOCATION]
    assert c.list_meta_context("disk.img", ["base:"]) == [P.BASE_ALLOCATION]
    assert c.list_meta_context("disk.img", ["x-other:thing"]) == []
    assert c.set_meta_context("disk.img", [P.BASE_ALLOCATION]) == {1: P.BASE_ALLOCATION}
    c.go("disk.img")
    assert c.block_status(0, 4096) == [(4096, 3)]
    c.disconnect()


def test_export_name_with_and_without_zeroes(server):
    for nz in (True, False):
        c = connect(server)
        c.hello(no_zeroes=nz)
        c.export_name("disk.img")
        assert c.size == SIZE
        c.write(0, b"hello")
        assert c.read(0, 5) == b"hello"
        c.disconnect()


def test_export_name_unknown_disconnects(server):
    c = connect(server)
    c.hello()
    c.send_option(P.OPT_EXPORT_NAME, b"missing")
    with pytest.raises((ConnectionError, OSError)):
        c.recv_exact(1)


@pytest.mark.parametrize("structured", [True, False])
def test_read_write_roundtrip(server, structured):
    c = opened(server, structured=structured)
    data = os.urandom(300_000)
    c.write(12345, data)
    assert c.read(12345, len(data)) == data
    big = os.urandom(2 * 1024 * 1024 + 7)  # direct-to-buffer payload path
    c.write(3 * 1024 * 1024 + 1, big, flags=P.CMD_FLAG_FUA)
    assert c.read(3 * 1024 * 1024 + 1, len(big)) == big
    c.flush()
    c.disconnect()


def test_structured_read_reports_holes(server):
    c = opened(server)
    c.write(1024 * 1024, b"\xff" * 65536)
    r = c.request(P.CMD_READ, 0, 2 * 1024 * 1024)
    assert r.error == 0
    types = [t for t, _, _ in r.chunks]
    assert P.REPLY_TYPE_OFFSET_HOLE in types and P.REPLY_TYPE_OFFSET_DATA in types
    assert bytes(r.data[1024 * 1024 : 1024 * 1024 + 65536]) == b"\xff" * 65536
    assert r.data[:1024 * 1024] == bytes(1024 * 1024)
    # DF: exactly one content chunk, zeroes inline
    r = c.request(P.CMD_READ, 1024 * 1024 - 4096, 65536 + 8192, flags=P.CMD_FLAG_DF)
    assert [t for t, _, _ in r.chunks] == [P.REPLY_TYPE_OFFSET_DATA]
    assert bytes(r.data[4096:8192]) == b"\xff" * 4096
    c.disconnect()


def test_block_status_trim_zero(server):
    c = opened(server)
    c.write(0, b"\x01" * 131072)
    ext = c.block_status(0, 1024 * 1024)
    assert ext[0] == (131072, 0) and ext[1][1] == P.STATE_HOLE | P.STATE_ZERO
    assert c.block_status(0, 1024 * 1024, flags=P.CMD_FLAG_REQ_ONE) == [(131072, 0)]
    c.trim(0, 65536)
    assert c.read(0, 65536) == bytes(65536)
    c.write_zeroes(65536, 65536, flags=P.CMD_FLAG_FUA)
    assert c.read(65536, 65536) == bytes(65536)
    assert c.block_status(0, 1024 * 1024)[0][1] == 3
    c.write(0, b"\x02" * 4096)
    c.write_zeroes(0, 4096, flags=P.CMD_FLAG_NO_HOLE)
    assert c.read(0, 4096) == bytes(4096)
    with pytest.raises(NBDError) as ei:
        c.write_zeroes(0, 4096, flags=P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO)
    assert ei.value.err == P.NBD_ENOTSUP
    c.write_zeroes(0, 4096, flags=P.CMD_FLAG_FAST_ZERO)
    c.cache(0, 1024 * 1024)
    c.disconnect()


def test_errors_carry_handles(server):
    c = opened(server)
    cases = [
        (P.CMD_READ, SIZE - 10, 20, 0, b"", P.NBD_EINVAL),
        (P.CMD_WRITE, SIZE - 10, 20, 0, b"x" * 20, P.NBD_ENOSPC),
        (P.CMD_TRIM, SIZE, 4096, 0, b"", P.NBD_ENOSPC),
        (P.CMD_WRITE_ZEROES, SIZE - 1, 2, 0, b"", P.NBD_ENOSPC),
        (P.CMD_BLOCK_STATUS, SIZE, 1, 0, b"", P.NBD_EINVAL),
        (P.CMD_CACHE, SIZE, 1, 0, b"", P.NBD_EINVAL),
        (P.CMD_READ, 0, 33 * 1024 * 1024, 0, b"", P.NBD_EOVERFLOW),
        (42, 0, 0, 0, b"", P.NBD_EINVAL),
        (P.CMD_WRITE, 0, 4, P.CMD_FLAG_REQ_ONE, b"abcd", P.NBD_EINVAL),
        (P.CMD_FLUSH, 1, 0, 0, b"", P.NBD_EINVAL),
        (P.CMD_READ, 0, 4096, 0x8000, b"", P.NBD_EINVAL),
    ]
    handles = {}
    for cmd, off, ln, fl, data, want in cases:
        handles[c.send_request(cmd, off, ln, fl, data)] = want
    for _ in cases:
        r = c.recv_reply()
        assert r.error == handles.pop(r.handle), r
    assert not handles
    assert c.read(0, 1) == b"\0"  # still serving
    c.disconnect()


def test_oversized_write_is_skipped(server):
    c = opened(server)
    n = 33 * 1024 * 1024
    r = c.request(P.CMD_WRITE, 0, n, 0, bytes(n))
    assert r.error == P.NBD_EOVERFLOW
    c.write(0, b"ok")
    assert c.read(0, 2) == b"ok"
    c.disconnect()


def test_readonly_export_eperm(server):
    c = opened(server, name="disk@snap")
    for cmd, data in ((P.CMD_WRITE, b"x" * 512), (P.CMD_TRIM, b""), (P.CMD_WRITE_ZEROES, b"")):
        r = c.request(cmd, 0, 512, 0, data)
        assert r.error == P.NBD_EPERM
    assert c.read(0, 512) == b"\x5a" * 512
    c.flush()
    c.disconnect()


def test_simple_reply_errors(server):
    c = opened(server, structured=False)
    r = c.request(P.CMD_READ, SIZE, 512)
    assert r.error == P.NBD_EINVAL and not r.data
    r = c.request(P.CMD_BLOCK_STATUS, 0, 512)
    assert r.error == P.NBD_EINVAL
    assert c.read(0, 3) == bytes(3)
    c.disconnect()


def test_bad_magic_and_garbage_disconnect_only_that_client(server):
    bad = opened(server)
    bad.send(b"\xde\xad\xbe\xef" * 7)
    with pytest.raises((ConnectionError, OSError)):
        bad.recv_exact(1)
    c = connect(server)
    c.hello()
    c.send(struct.pack(">QII", 0x1234, 1, 0))  # bad option magic
    with pytest.raises((ConnectionError, OSError)):
        c.recv_exact(1)
    c = connect(server)
    c.recv_exact(18)
    c.send(struct.pack(">I", 0xFF))  # unknown client flags
    with pytest.raises((ConnectionError, OSError)):
        c.recv_exact(1)
    c = connect(server)
    c.hello()
    c.send(struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, 1 << 30))  # absurd option length
    with pytest.raises((ConnectionError, OSError)):
        c.recv_exact(1)
    good = opened(server)
    assert good.read(0, 1) == b"\0"
    good.disconnect()


def test_client_vanishes_mid_payload(server):
    for size in (1000, 4 * 1024 * 1024):
        c = opened(server)
        c.send(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, size) + b"z" * (size // 2))
        c.sock.close()
    c = connect(server)
    c.hello()
    c.sock.close()  # vanish mid-handshake too
    good = opened(server)
    good.write(0, b"fine")
    assert good.read(0, 4) == b"fine"
    good.disconnect()


def test_pipelined_requests_out_of_order_handles(server):
    c = opened(server)
    n = 200
    for i in range(n):
        c.send_request(P.CMD_WRITE, i * 4096, 4096, 0, bytes([i % 256]) * 4096)
    got = {c.recv_reply().handle for _ in range(n)}
    assert len(got) == n
    hs = [c.send_request(P.CMD_READ, i * 4096, 4096) for i in range(n)]
    replies = {}
    for _ in range(n):
        r = c.recv_reply()
        replies[r.handle] = r.data
    for i, h in enumerate(hs):
        assert replies[h] == bytes([i % 256]) * 4096
    c.disconnect()


def test_pipelined_large_writes_read_back_on_another_connection(server):
    """Streamed payloads (the receive buffer grows to 1 MiB on the first) mixed with small
    requests, all sent before any reply is read, at unaligned offsets."""
    c = opened(server)
    writes = [
        (5, os.urandom(1024 * 1024 + 3)),
        (1024 * 1024 + 100, os.urandom(4096)),
        (2 * 1024 * 1024 + 1, os.urandom(700_000)),
        (4 * 1024 * 1024 - 7, os.urandom(3 * 1024 * 1024 + 11)),
        (7 * 1024 * 1024 + 8, os.urandom(200_000)),
    ]
    handles = [c.send_request(P.CMD_WRITE, off, len(data), 0, data) for off, data in writes]
    replies = {c.recv_reply().handle: None for _ in writes}
    assert set(replies) == set(handles)
    other = opened(server)
    for off, data in writes:
        assert other.read(off, len(data)) == data
    c.disconnect()
    other.disconnect()


def test_max_connections(server):
    clients = [connect(server) for _ in range(8)]
    for c in clients:
        c.hello()
    extra = connect(server)
    with pytest.raises((ConnectionError, OSError)):
        extra.recv_exact(18)
    for c in clients:
        c.close()
    time.sleep(0.2)
    good = opened(server)
    good.disconnect()


def test_memory_bounded_when_client_does_not_read(server):
    c = opened(server)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    req = b"".join(
        P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, 0, 1024 * 1024) for i in range(300)
    )
    c.send(req)
    time.sleep(0.5)
    srv = server.server
    assert srv is not None
    buffered = server.call(lambda: max(x.transport.get_write_buffer_size() for x in srv.connections))
    assert buffered < 48 * 1024 * 1024
    other = opened(server)
    assert other.read(0, 1) == b"\0"
    other.disconnect()
    c.close()


def test_close_flushes_devices_and_lets_requests_finish(export_dir):
    flushed = []

    class Provider(DirectoryProvider):
        def open_export(self, name):
            dev = super().open_export(name)
            if dev is not None and not hasattr(dev, "_wrapped"):
                orig = dev.flush

                def flush(orig=orig):
                    flushed.append(1)
                    orig()

                dev.flush = flush  # type: ignore[method-assign]
                dev._wrapped = True  # type: ignore[attr-defined]
            return dev

    st = ServerThread(Provider(export_dir)).start()
    c = opened(st)
    c.write(0, b"durable")
    st.stop()
    assert flushed
    with open(os.path.join(export_dir, "disk.img"), "rb") as f:
        assert f.read(7) == b"durable"
    with pytest.raises((ConnectionError, OSError)):
        c.read(0, 1)


def test_unix_socket(tmp_path, export_dir):
    path = str(tmp_path / "nbd.sock")
    st = ServerThread(DirectoryProvider(export_dir), host=None, port=None, unix_path=path).start()
    try:
        c = NBDClient.connect(unix=path).open("disk.img")
        c.write(0, b"unix")
        assert c.read(0, 4) == b"unix"
        c.disconnect()
    finally:
        st.stop()
    assert not os.path.exists(path)


def test_tls_required_semantics(tmp_path, export_dir):
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:" + os.urandom(32).hex() + "\n")
    from virtua.nbd.tls import TLSConfig

    st = ServerThread(
        DirectoryProvider(export_dir), tls=TLSConfig(psk_file=str(psk)), tls_mode="require"
    ).start()
    try:
        c = connect(st)
        c.hello()
        for opt, data in ((P.OPT_LIST, b""), (P.OPT_STRUCTURED_REPLY, b"")):
            with pytest.raises(OptionError) as ei:
                c.option(opt, data)
            assert ei.value.rep == P.REP_ERR_TLS_REQD
        with pytest.raises(OptionError) as ei:
            c.go("disk.img")
        assert ei.value.rep == P.REP_ERR_TLS_REQD
        c.send_option(P.OPT_EXPORT_NAME, b"disk.img")
        with pytest.raises((ConnectionError, OSError)):
            c.recv_exact(1)
    finally:
        st.stop()


def test_selective_tls_acl(tmp_path, export_dir):
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:" + os.urandom(32).hex() + "\n")
    from virtua.nbd.tls import TLSConfig

    provider = DirectoryProvider(export_dir, acl={"disk@snap": {"alice"}})
    st = ServerThread(provider, tls=TLSConfig(psk_file=str(psk)), tls_mode="on").start()
    try:
        c = connect(st)
        c.hello()
        assert [n for n, _ in c.list_exports()] == ["disk.img"]
        with pytest.raises(OptionError) as ei:
            c.go("disk@snap")
        assert ei.value.rep == P.REP_ERR_TLS_REQD
        c.go("disk.img")  # plaintext allowed on the open export
        c.disconnect()
    finally:
        st.stop()


def test_errno_mapping():
    assert nbd_errno(NoSpace("full")) == P.NBD_ENOSPC
    assert nbd_errno(ReadOnly("ro")) == P.NBD_EPERM
    assert nbd_errno(OSError(errno.EDQUOT, "quota")) == P.NBD_ENOSPC
    assert nbd_errno(OSError(errno.EFBIG, "big")) == P.NBD_ENOSPC
    assert nbd_errno(OSError(errno.ENOSPC, "full")) == P.NBD_ENOSPC
    assert nbd_errno(OSError(errno.EBADF, "?")) == P.NBD_EIO
    assert nbd_errno(RuntimeError("x")) == P.NBD_EIO


def test_psk_file_parsing(tmp_path):
    f = tmp_path / "k.psk"
    f.write_text("# comment\nalice:00ff\n\nbob:" + "ab" * 32 + "\n")
    assert read_psk_file(str(f)) == {b"alice": b"\x00\xff", b"bob": b"\xab" * 32}
    f.write_text("nocolon\n")
    with pytest.raises(ValueError):
        read_psk_file(str(f))
    f.write_text("alice:zz\n")
    with pytest.raises(ValueError):
        read_psk_file(str(f))


def test_server_argument_validation(export_dir):
    with pytest.raises(ValueError):
        NBDServer(DirectoryProvider(export_dir), tls_mode="require")
    with pytest.raises(ValueError):
        NBDServer(DirectoryProvider(export_dir), tls_mode="maybe")  # type: ignore[arg-type]


@pytest.mark.parametrize("structured", [True, False])
def test_large_read_after_the_file_shrank(server, export_dir, structured):
    """Large reads are copied into the socket by the kernel from a shared mapping of the
    file. When the file shrinks under the server, mapped pages past its new end cannot be
    read: the reply must come from the copy path (zeros past the end) and the server must
    stay up, not die of SIGBUS."""
    c = opened(server, structured=structured)
    data = os.urandom(1 << 20)
    c.write(0, data)
    assert c.read(0, 1 << 20) == data  # maps the file
    os.truncate(os.path.join(export_dir, "disk.img"), 4096)
    assert c.read(0, 1 << 20) == data[:4096] + bytes((1 << 20) - 4096)
    assert opened(server).read(0, 4096) == data[:4096]
