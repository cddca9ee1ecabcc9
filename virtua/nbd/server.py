"""An asyncio NBD server: fixed newstyle handshake, structured replies, TLS.

Design (see docs/nbd.md): one asyncio.BufferedProtocol per connection.  The
handshake is a coroutine reading from the protocol's buffer; the transmission
phase is a manual parser in buffer_updated() that executes every request inline
(the BlockDevice data path is synchronous page-cache I/O, and handing small
requests to threads costs 5-10x).  Replies are batched per receive into one
writelines() call; read buffers come from a per-connection pool and go back to
it as soon as the transport reports an empty write buffer.  Large write payloads
on plain connections are received into a buffer of their own and written to the device
by a worker thread (virtua.nbd.bulk) while the loop receives the next one; on TLS
connections they are streamed to the device straight from the receive buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import ssl
import struct
import termios
import time
from collections.abc import Callable
from typing import Any, Literal

from virtua.edge.limits import Admission, ConnectionLimits, source_of
from virtua.errors import VirtuaError
from virtua.nbd import proto as P
from virtua.nbd.bulk import BulkWorkers
from virtua.nbd.exports import ExportProvider
from virtua.nbd.tls import TLSConfig, peer_identity, peer_serial
from virtua.storage.device import BlockDevice, FileDevice, pread_padded
from virtua.storage.holders import Holder, Holders

TLSMode = Literal["off", "on", "require"]

_RBUF_SIZE = 256 * 1024
# The receive buffer of a connection in its handshake: small, so that thousands of
# half-open connections cost little; it grows to _RBUF_SIZE on entering transmission.
_RBUF_HANDSHAKE = 16 * 1024
# A connection that streams large writes gets a receive buffer this big instead: a 1 MiB
# payload then arrives in one or two reads and goes to the device in as many writes
# (12-23% faster on 1 MiB sequential writes than 256 KiB, measured alternating).
_RBUF_LARGE = 1024 * 1024
# Write payloads at least this big are streamed: each piece is written to the device
# straight from the receive buffer as it arrives (no reassembly copy).  Pieces end on
# _STREAM_ALIGN boundaries (one storage-engine chunk, many pages) except the last one.
_STREAM_MIN = 128 * 1024
_STREAM_ALIGN = 64 * 1024
_POOL_MAX_BYTES = 64 * 1024 * 1024
_HANDSHAKE_PAUSE = 128 * 1024
_WRITE_HIGH_WATER = 8 * 1024 * 1024
_SPARSE_READ_MIN = 64 * 1024  # structured reads this big report holes as OFFSET_HOLE
# A read reply this big is handed to the transport at once instead of at the end of the
# batch, so the client receives it while the next reads of the batch run.
_EAGER_REPLY = 128 * 1024
_SENDFILE_MIN = 128 * 1024  # below this the copy path is as cheap as two syscalls
# Write payloads at least this big, on plain connections to a device with start_write,
# are received into a buffer of their own and written to the device by a worker thread
# (virtua.nbd.bulk) while the loop receives the next one.
_BULK_WRITE_MIN = 256 * 1024
# At most this many of a connection's writes with a worker at once; past it the
# connection stops reading until one is done (bounded memory: payload buffers).
_BULK_PER_CONN = 8


_REQ_MAGIC = P.REQUEST_MAGIC
_REQ_SIZE = P.REQUEST_SIZE
_unpack_req = P.S_REQUEST.unpack_from
_pack_simple = P.S_SIMPLE_REPLY.pack
_pack_simple_into = P.S_SIMPLE_REPLY.pack_into
_pack_data_hdr_into = P.S_STRUCT_DATA_HDR.pack_into
_SIMPLE_MAGIC = P.SIMPLE_REPLY_MAGIC
_STRUCT_MAGIC = P.STRUCTURED_REPLY_MAGIC

# Command flags allowed per command (FUA is accepted on all commands, per spec).
_ALLOWED_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_DISC: P.CMD_FLAG_FUA,
    P.CMD_FLUSH: P.CMD_FLAG_FUA,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_CACHE: P.CMD_FLAG_FUA,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
}


# What a device (or an export provider) may raise for a request it cannot serve: an I/O
# error or one of the error tree's, answered with its NBD errno. Anything else is a bug
# of the server: it is not answered with a made-up errno but goes up to the catch-all of
# the handshake or of _process, which logs it with its traceback and drops the connection.
DEVICE_ERRORS = (OSError, VirtuaError)
# They are answered each time, and logged at most once per this many seconds.
DEVICE_ERROR_LOG_INTERVAL = 10.0


class _ReqError(Exception):
    def __init__(self, err: int, msg: str) -> None:
        super().__init__(msg)
        self.err = err
        self.msg = msg


def _client_address(transport: Any) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "unix socket"


def nbd_errno(exc: BaseException) -> int:
    """Map an exception from a device to one of the NBD protocol error values."""
    if isinstance(exc, VirtuaError):
        return P.ERRNO_TO_NBD.get(exc.errno, P.NBD_EIO)
    if isinstance(exc, OSError) and exc.errno is not None:
        return P.ERRNO_TO_NBD.get(exc.errno, P.NBD_EIO)
    if isinstance(exc, (ValueError, IndexError)):
        return P.NBD_EINVAL
    if isinstance(exc, MemoryError):
        return P.NBD_ENOMEM
    return P.NBD_EIO


class _ProtocolViolation(Exception):
    pass


class NBDServer:
    """Serve the exports of an ExportProvider over NBD (TCP and/or a unix socket)."""

    def __init__(
        self,
        provider: ExportProvider,
        *,
        tls: TLSConfig | None = None,
        tls_mode: TLSMode = "off",
        max_connections: int = ConnectionLimits.max_connections,
        max_connections_per_source: int = ConnectionLimits.max_connections_per_source,
        max_handshakes: int = ConnectionLimits.max_handshakes,
        max_handshakes_per_source: int = ConnectionLimits.max_handshakes_per_source,
        log: logging.Logger | None = None,
        handshake_timeout: float = ConnectionLimits.handshake_timeout,
        sparse_read_min: int = _SPARSE_READ_MIN,
        sparse_reads: bool | None = None,
        holders: Holders | None = None,
        tls_on_unix: bool = True,
    ) -> None:
        if tls_mode not in ("off", "on", "require"):
            raise ValueError(f"tls_mode must be off, on or require, not {tls_mode!r}")
        if tls_mode != "off" and tls is None:
            raise ValueError(f"tls_mode={tls_mode} needs a TLSConfig")
        self.provider = provider
        self.tls_mode: TLSMode = tls_mode
        self.tls_on_unix = tls_on_unix  # False: "require" applies to TCP only
        self.ssl_context: ssl.SSLContext | None = (
            tls.build_context() if tls is not None and tls_mode != "off" else None
        )
        # what drop_revoked was last asked with: a handshake under way then took the
        # context from before the revocation (no CRL of it), so its end asks again
        self.revoked: Callable[[int], bool] | None = None
        self.limits = ConnectionLimits(
            max_connections=max_connections,
            max_connections_per_source=max_connections_per_source,
            max_handshakes=min(max_handshakes, max_connections),
            max_handshakes_per_source=min(max_handshakes_per_source, max_connections_per_source),
            handshake_timeout=handshake_timeout,
        )
        self.log = log or logging.getLogger("virtua.nbd")
        self.handshake_timeout = handshake_timeout
        self.admission = Admission(self.limits, self.log)
        self.sparse_read_min = sparse_read_min
        # None = per device: its `sparse_reads` attribute, else on for everything but
        # FileDevice, whose SEEK_HOLE-based block_status costs O(allocated run) on tmpfs
        # (7 ms for a 1 GiB file) -- far too slow to run on every read.
        self.sparse_reads = sparse_reads
        self._servers: list[asyncio.AbstractServer] = []
        self.connections: set[_Connection] = set()
        self._devices: dict[int, BlockDevice] = {}
        self.closing = False
        self._closed: asyncio.Event | None = None
        self.unix_path: str | None = None
        self.stats = {"accepted": 0, "rejected": 0}
        self.holders = holders if holders is not None else Holders()  # who has which export open
        # a device's failures answered to clients: one warning per interval at most
        self.device_error_interval = DEVICE_ERROR_LOG_INTERVAL
        self._device_error_last = -DEVICE_ERROR_LOG_INTERVAL
        self._device_errors_unlogged = 0
        self.bulk: BulkWorkers | None = None  # started with the server (it needs the loop)
        # per device (id): the writes a worker is executing, each done when its reply is
        # decided; a FLUSH waits for those in flight when it arrives
        self.bulk_writes: dict[int, set[asyncio.Future[None]]] = {}

    # -- lifecycle ---------------------------------------------------------------

    async def start(
        self,
        host: str | None = "127.0.0.1",
        port: int | None = 10809,
        unix_path: str | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        if os.environ.get("VIRTUA_NBD_BULK", "1") != "0":  # 0: every request inline (A/B runs)
            self.bulk = BulkWorkers(loop)
        if host is not None and port is not None:
            srv = await loop.create_server(
                lambda: _Connection(self), host, port, reuse_address=True, backlog=1024
            )
            self._servers.append(srv)
        if unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(unix_path)
            srv = await loop.create_unix_server(
                lambda: _Connection(self, local=True), unix_path, backlog=1024
            )
            self.unix_path = unix_path
            self._servers.append(srv)
        if not self._servers:
            raise ValueError("nothing to listen on: give host+port and/or unix_path")

    @property
    def port(self) -> int | None:
        """The TCP port actually bound (useful with port=0)."""
        for srv in self._servers:
            for sock in getattr(srv, "sockets", None) or ():
                name = sock.getsockname()
                if isinstance(name, tuple):
                    return int(name[1])
        return None

    def drop_revoked(self, revoked: Callable[[int], bool]) -> int:
        """Cut every connection whose client certificate is now revoked: a new handshake
        already fails, but a session opened before would otherwise keep its export."""
        self.revoked = revoked
        cut = 0
        for c in list(self.connections):
            if c.peer_serial is not None and revoked(c.peer_serial):
                c._abort(f"the certificate of {c.identity!r} (serial {c.peer_serial:x}) is revoked")
                cut += 1
        return cut

    async def serve_forever(self) -> None:
        if self._closed is None:
            raise RuntimeError("start() first")
        await self._closed.wait()

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, finish in-flight requests, flush every device, disconnect."""
        if self.closing:
            if self._closed is not None:
                await self._closed.wait()
            return
        self.closing = True
        for srv in self._servers:
            srv.close()
        conns = list(self.connections)
        for c in conns:
            c.begin_shutdown()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(c.busy() for c in conns):
            await asyncio.sleep(0.01)
        for dev in list(self._devices.values()):
            try:
                dev.flush()
            except DEVICE_ERRORS as e:  # the device's own failure: say so, keep closing
                self.log.error("nbd: flush on close failed: %s", e)
            except Exception:  # noqa: BLE001 - a bug of ours: its traceback, and keep closing
                self.log.exception("nbd: internal error flushing a device on close")
        for c in conns:
            c.close()
        if self.bulk is not None:
            self.bulk.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2.0)
        if self.unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)
        if self._closed is not None:
            self._closed.set()

    def device_error(self, peer: str, export: str | None, what: str) -> None:
        """A device's failure, answered to its client with its errno: a warning at most once
        per device_error_interval (a failing disk fails every request), which says how many
        went unlogged since the last one."""
        now = time.monotonic()
        if now - self._device_error_last < self.device_error_interval:
            self._device_errors_unlogged += 1
            return
        n, self._device_errors_unlogged = self._device_errors_unlogged, 0
        self._device_error_last = now
        more = f" ({n} more device errors since the last one logged)" if n else ""
        self.log.warning("nbd %s: export %r: %s%s", peer, export, what, more)

    def _register_device(self, dev: BlockDevice) -> None:
        self._devices[id(dev)] = dev


class _Connection(asyncio.BufferedProtocol):
    """One NBD client connection."""

    def __init__(self, server: NBDServer, local: bool = False) -> None:
        self.srv = server
        self.local = local  # on the unix socket
        self.log = server.log
        self.transport: Any = None
        self.rbuf = bytearray(_RBUF_HANDSHAKE)
        self.rmv = memoryview(self.rbuf)
        self.start = 0
        self.end = 0
        self.transmission = False
        self.closed = False
        self.shutting_down = False
        self.write_paused = False
        self.reading_paused = False
        self.disconnecting = False
        # handshake
        self._need = 0
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.no_zeroes = False
        self.tls_active = False
        self.identity: str | None = None
        self.peer_serial: int | None = None
        self.structured = False
        self.meta_export: str | None = None
        self.meta_base_allocation = False
        # transmission
        self.dev: BlockDevice | None = None
        self.export_name = ""
        self.size = 0
        self.readonly = True
        self.sparse_min = 1 << 62
        self.out: list[Any] = []
        self._used: list[bytearray] = []
        self._lent: list[bytearray] = []
        self._pool: dict[int, list[bytearray]] = {}
        self._pool_bytes = 0
        self._skip = 0
        # the write being streamed: payload bytes still to come, where they go, and the
        # error to answer with (the rest of the payload is then read and dropped)
        self._ws_left = 0
        self._ws_off = 0
        self._ws_handle = 0
        self._ws_fua = False
        self._ws_err: tuple[int, str] | None = None
        # the large write whose payload is being received into a buffer of its own
        # (get_buffer hands libuv that buffer); then a worker writes it to the device
        self._bw_buf: bytearray | None = None
        self._bw_view: memoryview | None = None
        self._bw_fill = 0
        self._bw_off = 0
        self._bw_handle = 0
        self._bw_fua = False
        self._bw_inflight = 0  # this connection's writes with a worker
        # after a bulk write the next read is of one request header only, so that a
        # following bulk payload lands in its own buffer and is not copied there
        self._header_next = False
        # FLUSH and FUA replies waiting for the device's flush_async (off the loop)
        self._durable_waits: set[asyncio.Task[None]] = set()
        self.peer = ""
        self.admitted = False  # counted in srv.admission
        self._sock_fd: int | None = None  # for sendfile(2) on plain connections
        self._sock_dup: socket.socket | None = None  # its duplicate, for getsockopt
        self._physical_run: Any = None  # the device's physical_run, if it has one
        self._physical_view: Any = None  # and its physical_view
        self._run_is_data = False
        self.holder: Holder | None = None  # this connection in the server's Holders, once in transmission

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.transport = transport
        srv = self.srv
        if srv.closing or not srv.admission.admit(self, source_of(transport)):
            srv.stats["rejected"] += 1
            self.closed = True
            transport.abort()
            return
        self.admitted = True
        srv.stats["accepted"] += 1
        srv.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix"
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(Exception):
            self._sock_fd = sock.fileno() if sock is not None else None
        with contextlib.suppress(Exception):
            transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(srv.handshake_timeout, self._handshake_timed_out)
        self._task = loop.create_task(self._handshake())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.dev is not None:
            self.log.info("nbd %s: disconnected from export %r%s", self.peer, self.export_name,
                          f" ({exc})" if exc else "")
        self.srv.connections.discard(self)
        if self.admitted:
            self.srv.admission.release(self)
            self.admitted = False
        if self.holder is not None:
            self.srv.holders.remove(self.holder)
        if self._timer is not None:
            self._timer.cancel()
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionResetError("client disconnected"))
        self._pool.clear()
        self._lent.clear()
        if self._sock_dup is not None:
            self._sock_dup.close()
            self._sock_dup = None

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._reclaim()
        if self.transmission and not self.closed:
            self._process()
        if not self.write_paused:
            self._resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._bw_view is not None:
            return self._bw_view[self._bw_fill :]
        if self._header_next and self.start == self.end:
            self.start = self.end = 0
            return self.rmv[:_REQ_SIZE]
        free = len(self.rbuf) - self.end
        if free < 65536:
            self._compact()
            free = len(self.rbuf) - self.end
            if free < 4096:  # never hand out an empty buffer: grow (rare)
                self._grow(len(self.rbuf) * 2)
        return self.rmv[self.end :]

    def _grow(self, size: int) -> None:
        nb = bytearray(size)
        nb[: self.end] = self.rmv[: self.end]
        self.rbuf = nb
        self.rmv = memoryview(nb)

    def buffer_updated(self, nbytes: int) -> None:
        if self._bw_view is not None:
            self._bw_fill += nbytes
            if self._bw_fill == len(self._bw_view):
                self._bulk_write_received()
            return
        self._header_next = False
        self.end += nbytes
        if self.transmission:
            self._process()
        else:
            w = self._waiter
            if w is not None and not w.done() and self.end - self.start >= self._need:
                w.set_result(None)
            if self.end - self.start > _HANDSHAKE_PAUSE:
                self._pause_reading()

    def eof_received(self) -> bool | None:
        return False  # close the transport

    # -- helpers -----------------------------------------------------------------------

    def _compact(self) -> None:
        n = self.end - self.start
        if self.start:
            if n:
                self.rmv[:n] = self.rmv[self.start : self.end]
            self.start = 0
            self.end = n

    def _pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            with contextlib.suppress(Exception):
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.closed and not self.shutting_down and self._bw_inflight < _BULK_PER_CONN:
            self.reading_paused = False
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    def _abort(self, why: str) -> None:
        if not self.closed:
            self.log.warning("nbd %s: dropping connection: %s", self.peer, why)
            self.closed = True
            self.transport.abort()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._flush_out()
            self.transport.close()

    def busy(self) -> bool:
        if self.closed:
            return False
        if self._durable_waits or self._bw_inflight:
            return True
        try:
            return bool(self.transport.get_write_buffer_size())
        except Exception:
            return False

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        if not self.transmission:
            self._abort("server shutting down")
            return
        self._pause_reading()
        self.reading_paused = True

    def drop(self) -> None:
        """The admission drops this unfinished handshake to make room for a newer one."""
        if not self.closed:
            self.log.debug("nbd %s: dropping connection: the oldest unfinished handshake", self.peer)
            self.closed = True
            self.transport.abort()

    def _handshake_timed_out(self) -> None:
        # quietly: a flood of these is already reported once, by the admission
        if not self.transmission and not self.closed:
            self.log.debug("nbd %s: dropping connection: handshake timeout", self.peer)
            self.closed = True
            self.transport.abort()

    # -- buffer pool ---------------------------------------------------------------------

    def _get_buf(self, size: int) -> bytearray:
        lst = self._pool.get(size)
        if lst:
            self._pool_bytes -= size
            return lst.pop()
        return bytearray(size)

    def _put_buf(self, buf: bytearray) -> None:
        n = len(buf)
        if self._pool_bytes + n <= _POOL_MAX_BYTES:
            self._pool.setdefault(n, []).append(buf)
            self._pool_bytes += n

    def _reclaim(self) -> None:
        if self._lent and not self.closed and self.transport.get_write_buffer_size() == 0:
            for b in self._lent:
                self._put_buf(b)
            self._lent.clear()

    def _flush_out(self) -> None:
        out = self.out
        if not out:
            return
        t = self.transport
        if self.closed and t.is_closing():
            out.clear()
            self._used.clear()
            return
        if len(out) == 1:
            t.write(out[0])
        else:
            t.writelines(out)
        out.clear()
        used = self._used
        if used:
            if t.get_write_buffer_size() == 0:
                for b in used:
                    self._put_buf(b)
                if self._lent:
                    for b in self._lent:
                        self._put_buf(b)
                    self._lent.clear()
            else:
                self._lent.extend(used)
            used.clear()

    # -- handshake -----------------------------------------------------------------------

    async def _recv(self, n: int) -> bytes:
        while self.end - self.start < n:
            if self.closed:
                raise ConnectionResetError("closed")
            self._need = n
            self._waiter = asyncio.get_running_loop().create_future()
            self._resume_reading()
            try:
                await self._waiter
            finally:
                self._waiter = None
        s = self.start
        data = bytes(self.rmv[s : s + n])
        self.start = s + n
        if self.start == self.end:
            self.start = self.end = 0
        if self.end - self.start <= _HANDSHAKE_PAUSE:
            self._resume_reading()
        return data

    def _send_opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.transport.write(P.S_OPT_REPLY.pack(P.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _send_opt_error(self, opt: int, rtype: int, msg: str) -> None:
        self._send_opt_reply(opt, rtype, msg.encode()[: P.MAX_STRING])

    async def _handshake(self) -> None:
        try:
            await self._negotiate()
        except (ConnectionError, asyncio.CancelledError):
            if not self.closed:
                self.closed = True
                self.transport.abort()
        except _ProtocolViolation as e:
            self._abort(str(e))
        except ssl.SSLError as e:
            self._abort(f"TLS handshake failed: {e}")
        except Exception as e:  # noqa: BLE001 - never let a client crash the server
            self.log.exception("nbd %s: handshake error", self.peer)
            self._abort(f"internal error: {e}")

    async def _negotiate(self) -> None:
        srv = self.srv
        self.transport.write(
            P.S_SERVER_HELLO.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        )
        (cflags,) = P.S_U32.unpack(await self._recv(4))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise _ProtocolViolation(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        fixed = bool(cflags & P.FLAG_C_FIXED_NEWSTYLE)
        while True:
            magic, opt, length = P.S_OPT_HDR.unpack(await self._recv(P.S_OPT_HDR.size))
            if magic != P.IHAVEOPT:
                raise _ProtocolViolation(f"bad option magic {magic:#x}")
            if length > P.MAX_OPTION_LEN:
                raise _ProtocolViolation(f"option {opt} length {length} too large")
            data = await self._recv(length) if length else b""
            if opt == P.OPT_EXPORT_NAME:
                self._opt_export_name(data)
                return
            if not fixed:
                raise _ProtocolViolation("non-fixed newstyle client sent an option")
            if opt == P.OPT_ABORT:
                self._send_opt_reply(opt, P.REP_ACK)
                self.close()
                return
            if srv.closing:
                self._send_opt_error(opt, P.REP_ERR_SHUTDOWN, "server shutting down")
                continue
            if self._tls_required() and not self.tls_active and opt != P.OPT_STARTTLS:
                self.log.warning("nbd %s: refused option %d: TLS required", self.peer, opt)
                self._send_opt_error(opt, P.REP_ERR_TLS_REQD, "TLS required")
                continue
            if opt == P.OPT_STARTTLS:
                await self._opt_starttls(opt, data)
            elif opt == P.OPT_LIST:
                self._opt_list(opt, data)
            elif opt in (P.OPT_INFO, P.OPT_GO):
                if self._opt_info_go(opt, data):
                    return
            elif opt == P.OPT_STRUCTURED_REPLY:
                if data:
                    self._send_opt_error(opt, P.REP_ERR_INVALID, "no data expected")
                else:
                    self.structured = True
                    self._send_opt_reply(opt, P.REP_ACK)
            elif opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                self._opt_meta_context(opt, data)
            else:
                self._send_opt_error(opt, P.REP_ERR_UNSUP, f"option {opt} not supported")

    async def _opt_starttls(self, opt: int, data: bytes) -> None:
        ctx = self.srv.ssl_context
        if ctx is None:
            self._send_opt_error(opt, P.REP_ERR_UNSUP, "TLS not configured")
            return
        if self.tls_active:
            self._send_opt_error(opt, P.REP_ERR_INVALID, "TLS already active")
            return
        if data:
            self._send_opt_error(opt, P.REP_ERR_INVALID, "no data expected")
            return
        if self.end != self.start:
            raise _ProtocolViolation("data pipelined after STARTTLS")
        self._send_opt_reply(opt, P.REP_ACK)
        loop = asyncio.get_running_loop()
        self.reading_paused = False
        try:
            new = await loop.start_tls(
                self.transport, self, ctx, server_side=True, ssl_handshake_timeout=self.srv.handshake_timeout
            )
        except (ConnectionError, TimeoutError) as e:  # a refusal the peer hung up on is still a refusal
            raise ssl.SSLError(f"{type(e).__name__}: {e}") from e
        if new is None:
            raise ssl.SSLError("TLS aborted")
        self.transport = new
        self.tls_active = True
        self.identity = peer_identity(new)
        self.peer_serial = peer_serial(new)
        revoked = self.srv.revoked
        if self.peer_serial is not None and revoked is not None and revoked(self.peer_serial):
            raise ssl.SSLError(f"the certificate of {self.identity!r} (serial {self.peer_serial:x}) is revoked")
        # state negotiated before TLS does not carry over
        self.structured = False
        self.meta_export = None
        self.meta_base_allocation = False
        self.log.debug("nbd %s: TLS up, identity %r", self.peer, self.identity)

    def _opt_list(self, opt: int, data: bytes) -> None:
        if data:
            self._send_opt_error(opt, P.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        try:
            exports = self.srv.provider.list_exports()
        except DEVICE_ERRORS as e:
            self.srv.device_error(self.peer, None, f"cannot list exports: {e}")
            self._send_opt_error(opt, P.REP_ERR_PLATFORM, f"cannot list exports: {e}")
            return
        for name, desc in exports:
            if not self._allowed(name):
                continue
            nb = name.encode()
            self._send_opt_reply(opt, P.REP_SERVER, P.S_U32.pack(len(nb)) + nb + desc.encode())
        self._send_opt_reply(opt, P.REP_ACK)

    def _tls_required(self) -> bool:
        return self.srv.tls_mode == "require" and (self.srv.tls_on_unix or not self.local)

    def _allowed(self, name: str) -> bool:
        """The provider's policy. A policy that cannot be read (the device or the cluster's
        state failing) denies; any other exception is a bug and goes up to the handshake's
        catch-all (traceback, this connection dropped) instead of passing for a refusal."""
        try:
            return bool(self.srv.provider.allowed(name, self.identity))
        except DEVICE_ERRORS as e:
            self.log.warning("nbd %s: cannot check access to export %r: %s", self.peer, name, e)
            return False

    def _lookup(self, name: str) -> tuple[BlockDevice | None, int, str]:
        """(device, error reply type, message). The policy comes first: a client may not
        learn whether an export it may not open exists."""
        if not self._allowed(name):
            self.log.warning("nbd %s: identity %r may not open export %r", self.peer, self.identity, name)
            if not self.tls_active and self.srv.ssl_context is not None:
                return None, P.REP_ERR_TLS_REQD, f"export {name!r} requires TLS"
            return None, P.REP_ERR_POLICY, f"access to export {name!r} denied"
        try:
            dev = self.srv.provider.open_export(name)
        except DEVICE_ERRORS as e:
            self.srv.device_error(self.peer, name, f"cannot open export: {e}")
            return None, P.REP_ERR_UNKNOWN, f"cannot open export {name!r}: {e}"
        if dev is None:
            return None, P.REP_ERR_UNKNOWN, f"no export named {name!r}"
        return dev, 0, ""

    def _tx_flags(self, dev: BlockDevice) -> int:
        flags = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_CACHE | P.FLAG_CAN_MULTI_CONN
        if dev.readonly:
            flags |= P.FLAG_READ_ONLY
        else:
            flags |= (
                P.FLAG_SEND_FUA
                | P.FLAG_SEND_TRIM
                | P.FLAG_SEND_WRITE_ZEROES
                | P.FLAG_SEND_FAST_ZERO
            )
        if self.structured:
            flags |= P.FLAG_SEND_DF
        return flags

    def _opt_export_name(self, data: bytes) -> None:
        if self.srv.closing:
            raise _ProtocolViolation("server shutting down")
        if self._tls_required() and not self.tls_active:
            raise _ProtocolViolation("NBD_OPT_EXPORT_NAME without TLS")
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _ProtocolViolation("export name is not UTF-8") from e
        dev, _err, msg = self._lookup(name)
        if dev is None:
            raise _ProtocolViolation(msg)
        reply = P.S_EXPORT_NAME_REPLY.pack(dev.size, self._tx_flags(dev))
        if not self.no_zeroes:
            reply += bytes(124)
        self.transport.write(reply)
        self._enter_transmission(name, dev)

    def _opt_info_go(self, opt: int, data: bytes) -> bool:
        if len(data) < 6:
            self._send_opt_error(opt, P.REP_ERR_INVALID, "option too short")
            return False
        (nlen,) = P.S_U32.unpack_from(data, 0)
        if nlen > P.MAX_STRING or 4 + nlen + 2 > len(data):
            self._send_opt_error(opt, P.REP_ERR_INVALID, "bad export name length")
            return False
        (nreq,) = P.S_U16.unpack_from(data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * nreq:
            self._send_opt_error(opt, P.REP_ERR_INVALID, "bad information request count")
            return False
        try:
            name = data[4 : 4 + nlen].decode("utf-8")
        except UnicodeDecodeError:
            self._send_opt_error(opt, P.REP_ERR_INVALID, "export name is not UTF-8")
            return False
        reqs = {P.S_U16.unpack_from(data, 4 + nlen + 2 + 2 * i)[0] for i in range(nreq)}
        dev, err, msg = self._lookup(name)
        if dev is None:
            self._send_opt_error(opt, err, msg)
            return False
        rep = P.REP_INFO
        self._send_opt_reply(opt, rep, P.S_INFO_EXPORT.pack(P.INFO_EXPORT, dev.size, self._tx_flags(dev)))
        if P.INFO_NAME in reqs:
            self._send_opt_reply(opt, rep, P.S_U16.pack(P.INFO_NAME) + name.encode())
        if P.INFO_DESCRIPTION in reqs:
            desc = ""
            with contextlib.suppress(*DEVICE_ERRORS):  # a bug of the provider's is not hidden
                desc = dict(self.srv.provider.list_exports()).get(name, "")
            self._send_opt_reply(opt, rep, P.S_U16.pack(P.INFO_DESCRIPTION) + desc.encode()[:4096])
        pref = dev.block_size
        if pref < 512 or pref & (pref - 1) or pref > P.MAX_PAYLOAD:
            pref = 4096
        self._send_opt_reply(
            opt, rep, P.S_INFO_BLOCK_SIZE.pack(P.INFO_BLOCK_SIZE, 1, pref, P.MAX_PAYLOAD)
        )
        self._send_opt_reply(opt, P.REP_ACK)
        if opt == P.OPT_GO:
            self._enter_transmission(name, dev)
            return True
        return False

    def _parse_meta(self, data: bytes) -> tuple[str, list[str]] | None:
        try:
            pos = 0
            (nlen,) = P.S_U32.unpack_from(data, pos)
            pos += 4
            if nlen > P.MAX_STRING or pos + nlen > len(data):
                return None
            name = data[pos : pos + nlen].decode("utf-8")
            pos += nlen
            (nq,) = P.S_U32.unpack_from(data, pos)
            pos += 4
            queries = []
            for _ in range(nq):
                (qlen,) = P.S_U32.unpack_from(data, pos)
                pos += 4
                if qlen > P.MAX_STRING or pos + qlen > len(data):
                    return None
                queries.append(data[pos : pos + qlen].decode("utf-8"))
                pos += qlen
            if pos != len(data):
                return None
            return name, queries
        except (struct.error, UnicodeDecodeError):  # the client's malformed request
            return None

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self._send_opt_error(opt, P.REP_ERR_INVALID, "structured replies not negotiated")
            return
        parsed = self._parse_meta(data)
        if parsed is None:
            self._send_opt_error(opt, P.REP_ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        dev, err, msg = self._lookup(name)
        if dev is None:
            self._send_opt_error(opt, err, msg)
            return
        listing = opt == P.OPT_LIST_META_CONTEXT
        match = False
        if listing and not queries:
            match = True
        for q in queries:
            if q == P.BASE_ALLOCATION or (listing and q == "base:"):
                match = True
        if match:
            ctx_id = 0 if listing else P.BASE_ALLOCATION_ID
            self._send_opt_reply(
                opt, P.REP_META_CONTEXT, P.S_U32.pack(ctx_id) + P.BASE_ALLOCATION.encode()
            )
        if not listing:
            self.meta_export = name
            self.meta_base_allocation = match
        self._send_opt_reply(opt, P.REP_ACK)

    def _enter_transmission(self, name: str, dev: BlockDevice) -> None:
        if self.meta_export != name:
            self.meta_base_allocation = False
        self.dev = dev
        self.export_name = name
        self.size = dev.size
        self.readonly = bool(dev.readonly)
        sparse = self.srv.sparse_reads
        if sparse is None:
            sparse = bool(getattr(dev, "sparse_reads", not isinstance(dev, FileDevice)))
        self.sparse_min = self.srv.sparse_read_min if sparse else 1 << 62
        self._physical_run = getattr(dev, "physical_run", None)
        self._physical_view = getattr(dev, "physical_view", None)
        # a volume's physical run never covers a hole; a plain file's may (sparse file)
        self._run_is_data = not isinstance(dev, FileDevice)
        self.srv._register_device(dev)
        label = getattr(self.srv.provider, "holder_label", None)
        self.holder = Holder(name, _client_address(self.transport), self.identity, self.readonly,
                             label=label(name, self.identity) if label else None, disconnect=self._abort)
        self.srv.holders.add(self.holder)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if len(self.rbuf) < _RBUF_SIZE:
            self._compact()
            self._grow(_RBUF_SIZE)
        if self.admitted:
            self.srv.admission.handshake_done(self)
        self.transmission = True
        self.log.info("nbd %s: connected to export %r (%s, structured=%s)", self.peer, name,
                      f"TLS {self.identity}" if self.tls_active else "plain", self.structured)
        if self.end > self.start:  # requests pipelined behind the handshake
            asyncio.get_running_loop().call_soon(self._process)

    # -- transmission ----------------------------------------------------------------------

    def _process(self) -> None:
        """Parse and execute every complete request in the receive buffer."""
        if self.closed or self.disconnecting:
            return
        rbuf = self.rbuf
        try:
            while not self.write_paused:
                if self._skip:
                    k = min(self._skip, self.end - self.start)
                    self._skip -= k
                    self.start += k
                    if self._skip:
                        break
                if self._ws_left and not self._stream_write():
                    break
                start = self.start
                avail = self.end - start
                if avail < _REQ_SIZE:
                    break
                magic, flags, cmd, handle, offset, length = _unpack_req(rbuf, start)
                if magic != _REQ_MAGIC:
                    self._flush_out()
                    self._abort(f"bad request magic {magic:#x}")
                    return
                if cmd == 1:  # NBD_CMD_WRITE
                    if length > P.MAX_PAYLOAD:
                        self.start = start + _REQ_SIZE
                        self._skip = length
                        self._error(handle, P.NBD_EOVERFLOW, "write payload too large", cmd)
                        continue
                    total = _REQ_SIZE + length
                    if avail >= total:
                        p = start + _REQ_SIZE
                        self.start = start + total
                        self.holder.bytes_written += length  # type: ignore[union-attr]
                        self._write(flags, handle, offset, self.rmv[p : p + length])
                        continue
                    if length >= _BULK_WRITE_MIN and self._bulk_write_ok(flags, offset, length):
                        self.holder.bytes_written += length  # type: ignore[union-attr]
                        self._bulk_write_begin(flags, handle, offset, length, start + _REQ_SIZE)
                        break
                    if length >= _STREAM_MIN:
                        if len(rbuf) < _RBUF_LARGE:
                            self._grow(_RBUF_LARGE)  # this client writes big: read big
                            rbuf = self.rbuf
                        self.start = start + _REQ_SIZE
                        self.holder.bytes_written += length  # type: ignore[union-attr]
                        self._ws_left = length
                        self._ws_off = offset
                        self._ws_handle = handle
                        self._ws_fua = bool(flags & P.CMD_FLAG_FUA)
                        self._ws_err = self._write_check(flags, offset, length)
                        continue
                    if start + total > len(rbuf):
                        self._compact()
                    break
                self.start = start + _REQ_SIZE
                if cmd == 0:  # NBD_CMD_READ
                    self.holder.bytes_read += length  # type: ignore[union-attr]
                    self._read(flags, handle, offset, length)
                elif cmd == 2:  # NBD_CMD_DISC
                    self.disconnecting = True
                    self._flush_out()
                    if not self._durable_waits and not self._bw_inflight:  # else the last of them closes
                        self.close()
                    return
                else:
                    self._other(cmd, flags, handle, offset, length)
            if self.start == self.end:
                self.start = self.end = 0
        except Exception as e:  # noqa: BLE001 - a bug of ours: log it, drop this connection only
            self.log.exception("nbd %s: internal error on export %r, dropping the connection",
                               self.peer, self.export_name)
            self._flush_out()
            self._abort(f"internal error: {e}")
            return
        self._flush_out()
        if self.write_paused:
            self._pause_reading()

    def _bulk_write_ok(self, flags: int, offset: int, length: int) -> bool:
        """A write to hand to a worker: plain connection, device that can plan one, and
        nothing to refuse (refused payloads take the streaming path, which drops them)."""
        return (
            self.srv.bulk is not None
            and not self.tls_active
            and self._write_check(flags, offset, length) is None
            and getattr(self.dev, "start_write", None) is not None
        )

    def _bulk_write_begin(self, flags: int, handle: int, offset: int, length: int, payload: int) -> None:
        """Receive the payload into a buffer of its own: what the receive buffer already
        holds of it is copied there, the rest libuv reads into it directly."""
        buf = self._get_buf(length)
        have = self.end - payload  # < length: the payload runs past the buffered bytes
        buf[:have] = self.rmv[payload : self.end]
        self.start = self.end = 0
        self._bw_buf = buf
        self._bw_view = memoryview(buf)
        self._bw_fill = have
        self._bw_off = offset
        self._bw_handle = handle
        self._bw_fua = bool(flags & P.CMD_FLAG_FUA)

    def _bulk_write_received(self) -> None:
        """The whole payload is in: plan the write here (the block map has one writer),
        hand its pwrite to a worker, and go on reading."""
        buf, view = self._bw_buf, self._bw_view
        assert buf is not None and view is not None
        self._bw_buf = self._bw_view = None
        self._header_next = True
        handle, fua = self._bw_handle, self._bw_fua
        dev = self.dev
        try:
            plan = dev.start_write(self._bw_off, view)  # type: ignore[union-attr]
        except DEVICE_ERRORS as e:
            self._put_buf(buf)
            self._device_error(handle, e, "write", 1)
            self._flush_out()
            return
        srv = self.srv
        assert srv.bulk is not None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        writes = srv.bulk_writes.setdefault(id(dev), set())
        writes.add(fut)
        self._bw_inflight += 1
        if self._bw_inflight >= _BULK_PER_CONN:
            self._pause_reading()

        def done() -> None:
            plan.end()  # its rows, unless a flush of the pool ended it first
            writes.discard(fut)
            fut.set_result(None)
            self._bw_inflight -= 1
            self._put_buf(buf)
            if self.closed:
                return
            if plan.error is not None:
                self._device_error(handle, plan.error, "write", 1)
            elif fua:
                self._reply_when_durable(handle, 1)
            else:
                self.out.append(_pack_simple(_SIMPLE_MAGIC, 0, handle))
            self._flush_out()
            if self.disconnecting:
                if not self._durable_waits and not self._bw_inflight:
                    self.close()
            elif not self.write_paused:
                self._resume_reading()

        srv.bulk.submit(plan, done)

    def _stream_write(self) -> bool:
        """Write what the buffer holds of a streamed payload; True once it is complete."""
        start = self.start
        left = self._ws_left
        k = self.end - start
        if k < left:
            # stop at an aligned boundary; wait for more if that leaves a small piece
            k = ((self._ws_off + k) & -_STREAM_ALIGN) - self._ws_off
            if k < _STREAM_ALIGN:
                return False
        else:
            k = left
        self.start = start + k
        self._ws_left = left = left - k
        if self._ws_err is None:
            try:
                self.dev.write(self._ws_off, self.rmv[start : start + k])  # type: ignore[union-attr]
            except DEVICE_ERRORS as e:
                self._ws_err = (nbd_errno(e), f"write failed: {e}")
                self.srv.device_error(self.peer, self.export_name, self._ws_err[1])
        self._ws_off += k
        if left:
            return False
        if self._ws_err is not None:
            self._error(self._ws_handle, self._ws_err[0], self._ws_err[1], 1)
        elif self._ws_fua:
            self._reply_when_durable(self._ws_handle, 1)
        else:
            self.out.append(_pack_simple(_SIMPLE_MAGIC, 0, self._ws_handle))
        return True

    def _device_error(self, handle: int, e: BaseException, what: str, cmd: int) -> None:
        msg = f"{what} failed: {e}"
        self.srv.device_error(self.peer, self.export_name, msg)
        self._error(handle, nbd_errno(e), msg, cmd)

    def _ok(self, handle: int) -> None:
        self.out.append(_pack_simple(_SIMPLE_MAGIC, 0, handle))

    def _error(self, handle: int, err: int, msg: str, cmd: int) -> None:
        if self.structured:
            m = msg.encode()[:4096]
            self.out.append(
                P.S_STRUCT_ERROR.pack(
                    _STRUCT_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, handle, 6 + len(m), err, len(m)
                )
                + m
            )
        else:
            self.out.append(_pack_simple(_SIMPLE_MAGIC, err, handle))

    def _write_check(self, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        if flags & ~P.CMD_FLAG_FUA:
            return P.NBD_EINVAL, "invalid flags for WRITE"
        if self.readonly:
            return P.NBD_EPERM, "export is read-only"
        if offset + length > self.size:
            return P.NBD_ENOSPC, "write beyond end of export"
        if self.shutting_down:
            return P.NBD_ESHUTDOWN, "server shutting down"
        return None

    def _write(self, flags: int, handle: int, offset: int, data: memoryview) -> None:
        err = self._write_check(flags, offset, len(data))
        if err is not None:
            return self._error(handle, err[0], err[1], 1)
        try:
            self.dev.write(offset, data)  # type: ignore[union-attr]
        except DEVICE_ERRORS as e:
            return self._device_error(handle, e, "write", 1)
        if flags & P.CMD_FLAG_FUA:
            return self._reply_when_durable(handle, 1)
        self.out.append(_pack_simple(_SIMPLE_MAGIC, 0, handle))

    def _read(self, flags: int, handle: int, offset: int, length: int) -> None:
        if flags & ~(P.CMD_FLAG_FUA | P.CMD_FLAG_DF) or (flags & P.CMD_FLAG_DF and not self.structured):
            return self._error(handle, P.NBD_EINVAL, "invalid flags for READ", 0)
        if length > P.MAX_PAYLOAD:
            return self._error(handle, P.NBD_EOVERFLOW, "read too large", 0)
        if offset + length > self.size:
            return self._error(handle, P.NBD_EINVAL, "read beyond end of export", 0)
        dev = self.dev
        assert dev is not None
        # A large read inside one contiguous run of the device's file can go from the file
        # to the socket directly, and on a volume has no holes: no need to ask for block
        # status (20 us of Python for 1 MiB, ten times the run lookup).
        where = None
        if length >= _SENDFILE_MIN and self._physical_run is not None:
            try:
                where = self._physical_run(offset, length)
            except DEVICE_ERRORS:  # the copy path reports them properly
                where = None
        if not self.structured:
            if where is None or not self._sendfile_read(handle, offset, length, where):
                self._read_chunk(handle, offset, length, True)
            return
        if length == 0:
            self.out.append(
                P.S_STRUCT_REPLY.pack(_STRUCT_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, handle, 0)
            )
            return
        if (where is None or not self._run_is_data) and length >= self.sparse_min and not flags & P.CMD_FLAG_DF:
            try:
                extents = dev.block_status(offset, length)
            except DEVICE_ERRORS:  # fall back to a plain read
                extents = []
            if len(extents) > 1 or (extents and extents[0].flags & P.STATE_ZERO):
                return self._sparse_read(handle, offset, length, extents)
        if where is not None and self._sendfile_read(handle, offset, length, where):
            return
        self._read_chunk(handle, offset, length, True)

    def _sendfile_read(self, handle: int, offset: int, length: int, where: tuple[int, int]) -> bool:
        """A large read straight from the device's file into the socket: header and data in
        one writev(2) from a shared mapping of the file (page cache -> socket, one copy, by
        the kernel), or header then sendfile(2) where the device has no mapping for the
        range. `where` is (fd, position) of the range, one contiguous run of data. Only on
        plain TCP/unix connections, and only when nothing is queued ahead of us in the
        transport (so bytes stay in order). False: use the copy path."""
        sock_fd = self._sock_fd
        if self.tls_active or sock_fd is None:
            return False
        self._flush_out()
        t = self.transport
        if t.is_closing() or t.get_write_buffer_size():
            return False
        # Only when the socket has room for the whole reply: a partial sendfile would have
        # to copy the rest anyway, and then costs more than the copy path.
        try:
            sock = self._sock_dup
            if sock is None:  # a duplicate descriptor: closing it never touches uvloop's
                sock = self._sock_dup = socket.socket(fileno=os.dup(sock_fd))
            queued = struct.unpack("i", fcntl.ioctl(sock_fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            # autotuning grows SO_SNDBUF: ask each time
            room = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - queued
        except OSError:
            return False
        if length + 64 > room:
            return False
        fd, pos = where
        if self.structured:
            hdr = bytearray(28)
            _pack_data_hdr_into(hdr, 0, _STRUCT_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA,
                                handle, length + 8, offset)
        else:
            hdr = bytearray(16)
            _pack_simple_into(hdr, 0, _SIMPLE_MAGIC, 0, handle)
        view = None
        if self._physical_view is not None:
            try:
                view = self._physical_view(pos, length)
            except (OSError, ValueError):  # a file that cannot be mapped: sendfile it
                view = None
        hl = len(hdr)
        try:
            # with a view: header and data in one writev, never read by Python
            sent = os.writev(sock_fd, [hdr, view]) if view is not None else os.write(sock_fd, hdr)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # nothing went out (EFAULT: the file could not supply a page)
            return False
        if sent < hl:  # socket full: queue the rest of the header and the data, in order
            t.write(bytes(hdr[sent:]))
            try:
                t.write(pread_padded(fd, length, pos))
            except OSError as e:  # part of the header is out: the stream cannot be repaired
                self._abort(f"read failed after its reply header was sent: {e}")
            return True
        done = sent - hl
        try:
            while done < length:
                if view is not None:
                    n = os.write(sock_fd, view[done:])
                else:
                    n = os.sendfile(sock_fd, fd, pos + done, length - done)
                if n <= 0:
                    break  # end of the data file: the rest was never written
                done += n
        except OSError:  # EAGAIN, or a page the file cannot supply: pread reports it
            pass
        if done < length:
            try:
                t.write(pread_padded(fd, length - done, pos + done))
            except OSError as e:  # the header is out: the stream cannot be repaired
                self._abort(f"read failed after its reply header was sent: {e}")
        return True

    def _read_chunk(self, handle: int, offset: int, length: int, done: bool) -> bool:
        """Reply with data copied into a pooled buffer behind its header: a simple reply,
        or a structured OFFSET_DATA chunk (the last of its reply if `done`)."""
        # The header is packed here rather than by a helper: this is the 4 KiB read path.
        if self.structured:
            hs = 28
            buf = self._get_buf(28 + length)
            _pack_data_hdr_into(buf, 0, _STRUCT_MAGIC, 1 if done else 0, P.REPLY_TYPE_OFFSET_DATA,
                                handle, length + 8, offset)
        else:
            hs = 16
            buf = self._get_buf(16 + length)
            _pack_simple_into(buf, 0, _SIMPLE_MAGIC, 0, handle)
        mv = memoryview(buf)
        try:
            self.dev.readinto(offset, mv[hs:])  # type: ignore[union-attr]
        except DEVICE_ERRORS as e:
            self._put_buf(buf)
            self._device_error(handle, e, "read", 0)
            return False
        self.out.append(buf)
        self._used.append(buf)
        if length >= _EAGER_REPLY:
            self._flush_out()
        return True

    def _sparse_read(self, handle: int, offset: int, length: int, extents: list[Any]) -> None:
        end = offset + length
        pos = offset
        # normalise: clip to the request, fill any gap with data
        chunks: list[tuple[int, int, bool]] = []
        for ext in extents:
            s = max(ext.offset, pos)
            e = min(ext.offset + ext.length, end)
            if e <= s:
                continue
            if s > pos:
                chunks.append((pos, s - pos, False))
            zero = bool(ext.flags & P.STATE_ZERO)
            if chunks and chunks[-1][2] == zero and chunks[-1][0] + chunks[-1][1] == s:
                chunks[-1] = (chunks[-1][0], chunks[-1][1] + e - s, zero)
            else:
                chunks.append((s, e - s, zero))
            pos = e
        if pos < end:
            chunks.append((pos, end - pos, False))
        last = len(chunks) - 1
        for i, (s, n, zero) in enumerate(chunks):
            done = i == last
            if zero:
                self.out.append(
                    P.S_STRUCT_HOLE.pack(
                        _STRUCT_MAGIC, 1 if done else 0, P.REPLY_TYPE_OFFSET_HOLE, handle, 12, s, n
                    )
                )
            elif not self._read_chunk(handle, s, n, done):
                return

    def _other(self, cmd: int, flags: int, handle: int, offset: int, length: int) -> None:
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return self._error(handle, P.NBD_EINVAL, f"unknown command {cmd}", cmd)
        if flags & ~allowed:
            return self._error(handle, P.NBD_EINVAL, f"invalid flags {flags:#x} for command {cmd}", cmd)
        dev = self.dev
        assert dev is not None
        fua = bool(flags & P.CMD_FLAG_FUA)
        try:
            if cmd == P.CMD_FLUSH:
                if offset or length:
                    return self._error(handle, P.NBD_EINVAL, "FLUSH offset/length must be 0", cmd)
                return self._reply_when_durable(handle, cmd)
            elif cmd == P.CMD_TRIM or cmd == P.CMD_WRITE_ZEROES:
                if self.readonly:
                    return self._error(handle, P.NBD_EPERM, "export is read-only", cmd)
                if offset + length > self.size:
                    return self._error(handle, P.NBD_ENOSPC, "beyond end of export", cmd)
                if self.shutting_down:
                    return self._error(handle, P.NBD_ESHUTDOWN, "server shutting down", cmd)
                if cmd == P.CMD_TRIM:
                    if length:
                        dev.discard(offset, length)
                else:
                    no_hole = bool(flags & P.CMD_FLAG_NO_HOLE)
                    if flags & P.CMD_FLAG_FAST_ZERO and (
                        no_hole or not getattr(dev, "fast_zero", True)
                    ):
                        return self._error(handle, P.NBD_ENOTSUP, "fast zero not possible", cmd)
                    if no_hole:
                        # bounded memory if the device writes real zeroes
                        pos, end = offset, offset + length
                        while pos < end:
                            n = min(end - pos, P.MAX_PAYLOAD)
                            dev.write_zeroes(pos, n, False)
                            pos += n
                    elif length:
                        dev.write_zeroes(offset, length, True)
            elif cmd == P.CMD_CACHE:
                if offset + length > self.size:
                    return self._error(handle, P.NBD_EINVAL, "beyond end of export", cmd)
                cache = getattr(dev, "cache", None)
                if cache is not None:
                    cache(offset, length)
            elif cmd == P.CMD_BLOCK_STATUS:
                return self._block_status(flags, handle, offset, length)
        except _ReqError as e:
            return self._error(handle, e.err, e.msg, cmd)
        except DEVICE_ERRORS as e:
            return self._device_error(handle, e, f"command {cmd}", cmd)
        if fua and cmd in (P.CMD_TRIM, P.CMD_WRITE_ZEROES):
            return self._reply_when_durable(handle, cmd)
        self.out.append(_pack_simple(_SIMPLE_MAGIC, 0, handle))

    def _reply_when_durable(self, handle: int, cmd: int) -> None:
        """Reply once every write acknowledged so far is durable (FLUSH, FUA). A device
        with flush_async does the work off the loop, and this connection and the others
        go on meanwhile (NBD replies may come out of order); else flush() inline."""
        dev = self.dev
        assert dev is not None
        flush_async = getattr(dev, "flush_async", None)
        if flush_async is None:
            try:
                dev.flush()
            except DEVICE_ERRORS as e:
                return self._device_error(handle, e, "flush", cmd)
            return self._ok(handle)
        # writes a worker is executing now first: one may be acknowledged on another
        # connection before this FLUSH is (NBD asks only for those acknowledged before)
        writes = list(self.srv.bulk_writes.get(id(dev), ()))
        task = asyncio.get_running_loop().create_task(self._durable_then_reply(flush_async, handle, cmd, writes))
        self._durable_waits.add(task)

    async def _durable_then_reply(
        self, flush_async: Any, handle: int, cmd: int, writes: list[asyncio.Future[None]]
    ) -> None:
        try:
            if writes:
                await asyncio.wait(writes)
            await flush_async()
        except DEVICE_ERRORS as e:
            self._device_error(handle, e, "flush", cmd)
        except Exception as e:  # noqa: BLE001 - a bug of ours: log it, drop this connection only
            self.log.exception("nbd %s: internal error flushing export %r, dropping the connection",
                               self.peer, self.export_name)
            self._durable_waits.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._abort(f"internal error: {e}")
            return
        else:
            self._ok(handle)
        finally:
            self._durable_waits.discard(asyncio.current_task())  # type: ignore[arg-type]
        self._flush_out()
        if self.disconnecting and not self._durable_waits and not self._bw_inflight:
            self.close()

    def _block_status(self, flags: int, handle: int, offset: int, length: int) -> None:
        cmd = P.CMD_BLOCK_STATUS
        if not self.meta_base_allocation:
            return self._error(handle, P.NBD_EINVAL, "no metadata context negotiated", cmd)
        if length == 0 or offset + length > self.size:
            return self._error(handle, P.NBD_EINVAL, "block status range invalid", cmd)
        dev = self.dev
        assert dev is not None
        try:
            extents = dev.block_status(offset, length)
        except DEVICE_ERRORS as e:
            return self._device_error(handle, e, "block status", cmd)
        descs: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        for ext in extents:
            s = max(ext.offset, pos)
            stop = min(ext.offset + ext.length, end)
            if stop <= s or s != pos:
                break  # stop at a gap or disorder: a shorter answer is allowed
            st = ext.flags & (P.STATE_HOLE | P.STATE_ZERO)
            if descs and descs[-1][1] == st:
                descs[-1] = (descs[-1][0] + stop - s, st)
            else:
                descs.append((stop - s, st))
            pos = stop
            if len(descs) > 65536:
                break
        if not descs:
            descs = [(length, 0)]
        if flags & P.CMD_FLAG_REQ_ONE:
            descs = descs[:1]
        n = len(descs)
        out = bytearray(20 + 4 + 8 * n)
        P.S_STRUCT_REPLY.pack_into(
            out, 0, _STRUCT_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, handle, 4 + 8 * n
        )
        P.S_U32.pack_into(out, 20, P.BASE_ALLOCATION_ID)
        pack = P.S_BS_DESC.pack_into
        for i, (ln, st) in enumerate(descs):
            pack(out, 24 + 8 * i, ln, st)
        self.out.append(out)


__all__ = ["NBDServer", "TLSConfig", "TLSMode", "nbd_errno"]
