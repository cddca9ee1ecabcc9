"""Fuzz the handshake and request parser of a running server over real sockets.

Whatever arrives, the server must neither crash nor wedge: after every example a
well-behaved client must still get correct service.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtua.nbd import proto as P
from virtua.nbd.client import NBDClient
from virtua.nbd.exports import DirectoryProvider
from virtua.nbd.testing import ServerThread

SIZE = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerThread]:
    d = tmp_path_factory.mktemp("fuzz")
    with open(d / "disk.img", "wb") as f:
        f.truncate(SIZE)
    with open(d / "ro@snap", "wb") as f:
        f.truncate(SIZE)
    provider = DirectoryProvider(str(d))
    st_ = ServerThread(provider, sparse_reads=True, handshake_timeout=2.0).start()
    yield st_
    st_.stop()
    provider.close()


def _blast(port: int, data: bytes) -> None:
    """Send data, drain whatever comes back for a moment, then hang up."""
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        s.settimeout(0.02)
        try:
            s.sendall(data)
        except OSError:
            return
        try:
            for _ in range(50):
                if not s.recv(1 << 20):
                    break
        except (TimeoutError, OSError):
            pass
    finally:
        s.close()
    _check_alive(port)


def _check_alive(port: int) -> None:
    c = NBDClient.connect(port=port).open("disk.img")
    c.write(4096, b"alive")
    assert c.read(4096, 5) == b"alive"
    c.disconnect()


def _valid_prefix(structured: bool, meta: bool, name: bytes = b"disk.img") -> bytes:
    out = P.S_U32.pack(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
    if structured:
        out += P.S_OPT_HDR.pack(P.IHAVEOPT, P.OPT_STRUCTURED_REPLY, 0)
    if meta:
        q = P.BASE_ALLOCATION.encode()
        data = P.S_U32.pack(len(name)) + name + P.S_U32.pack(1) + P.S_U32.pack(len(q)) + q
        out += P.S_OPT_HDR.pack(P.IHAVEOPT, P.OPT_SET_META_CONTEXT, len(data)) + data
    go = P.S_U32.pack(len(name)) + name + P.S_U16.pack(1) + P.S_U16.pack(P.INFO_BLOCK_SIZE)
    out += P.S_OPT_HDR.pack(P.IHAVEOPT, P.OPT_GO, len(go)) + go
    return out


options = st.builds(
    lambda opt, data, lie: P.S_OPT_HDR.pack(P.IHAVEOPT, opt, len(data) + lie) + data,
    st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0xFFFFFFFF]),
    st.binary(max_size=64),
    st.sampled_from([0, 0, 0, 1, -1, 100]).map(lambda x: max(x, 0)),
)

requests = st.builds(
    lambda flags, cmd, handle, off, ln, payload: P.S_REQUEST.pack(
        P.REQUEST_MAGIC, flags, cmd, handle, off, ln
    )
    + payload,
    st.integers(0, 0xFFFF),
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xFFFF]),
    st.integers(0, 2**64 - 1),
    st.one_of(st.integers(0, SIZE), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 8192), st.integers(0, 2**32 - 1)),
    st.binary(max_size=256),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.binary(max_size=512))
def test_random_bytes_handshake(server, data):
    _blast(server.port, data)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.sampled_from([P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES, 0, 1, 2, 7]),
    st.lists(options, max_size=6),
)
def test_option_sequences(server, cflags, opts):
    _blast(server.port, P.S_U32.pack(cflags) + b"".join(opts))


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.booleans(),
    st.booleans(),
    st.sampled_from([b"disk.img", b"ro@snap"]),
    st.lists(requests, max_size=8),
)
def test_request_sequences(server, structured, meta, name, reqs):
    _blast(server.port, _valid_prefix(structured, meta, name) + b"".join(reqs))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.data())
def test_mutated_valid_stream(server, data):
    stream = bytearray(
        _valid_prefix(True, True)
        + P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 16) + b"x" * 16
        + P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 2, 0, 4096)
        + P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_BLOCK_STATUS, 3, 0, 65536)
        + P.S_REQUEST.pack(P.REQUEST_MAGIC, 1, P.CMD_FLUSH, 4, 0, 0)
    )
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "dup"]))
        i = data.draw(st.integers(0, len(stream) - 1))
        if kind == "flip":
            stream[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set":
            stream[i] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del stream[i:]
            if not stream:
                stream = bytearray(b"\0")
        else:
            stream[i:i] = stream[i : i + data.draw(st.integers(1, 40))]
    _blast(server.port, bytes(stream))


def test_server_survived(server):
    _check_alive(server.port)
    assert server._thread is not None and server._thread.is_alive()
    srv = server.server
    assert srv is not None
    # nothing left half-open beyond the handshake timeout
    _check_alive(server.port)
