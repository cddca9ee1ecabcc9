"""A small blocking NBD client: enough for tests, health checks and tools.

Not a performance client (use libnbd/qemu for that); one request at a time unless
you use send_request()/recv_reply() yourself.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass, field

from virtua.nbd import proto as P


class NBDError(Exception):
    def __init__(self, err: int, msg: str = "") -> None:
        super().__init__(f"NBD error {err}: {msg}")
        self.err = err
        self.msg = msg


class OptionError(Exception):
    def __init__(self, opt: int, rep: int, msg: str) -> None:
        super().__init__(f"option {opt} failed with {rep:#x}: {msg}")
        self.opt = opt
        self.rep = rep
        self.msg = msg


@dataclass
class Reply:
    handle: int
    error: int = 0
    message: str = ""
    data: bytearray = field(default_factory=bytearray)
    holes: list[tuple[int, int]] = field(default_factory=list)
    chunks: list[tuple[int, int, int]] = field(default_factory=list)  # (type, offset, length)
    extents: list[tuple[int, int]] = field(default_factory=list)


class NBDClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | ssl.SSLSocket = sock
        self.structured = False
        self.size = 0
        self.flags = 0
        self.block_sizes: tuple[int, int, int] | None = None
        self.meta: dict[int, str] = {}
        self._handle = 0
        self._pending: dict[int, tuple[int, int, int]] = {}  # handle -> (cmd, offset, length)

    # -- connection ------------------------------------------------------------------------

    @classmethod
    def connect(
        cls, host: str = "127.0.0.1", port: int = 10809, unix: str | None = None, timeout: float = 10
    ) -> NBDClient:
        if unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(unix)
        else:
            s = socket.create_connection((host, port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(s)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- handshake -------------------------------------------------------------------------

    def hello(self, no_zeroes: bool = True) -> int:
        magic, opt_magic, hflags = P.S_SERVER_HELLO.unpack(self.recv_exact(18))
        if magic != P.NBDMAGIC or opt_magic != P.IHAVEOPT:
            raise ConnectionError("not a newstyle NBD server")
        cflags = P.FLAG_C_FIXED_NEWSTYLE | (P.FLAG_C_NO_ZEROES if no_zeroes else 0)
        self.send(P.S_U32.pack(cflags))
        self.no_zeroes = no_zeroes
        return int(hflags)

    def send_option(self, opt: int, data: bytes = b"") -> None:
        self.send(P.S_OPT_HDR.pack(P.IHAVEOPT, opt, len(data)) + data)

    def recv_option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = P.S_OPT_REPLY.unpack(self.recv_exact(20))
        if magic != P.OPT_REPLY_MAGIC:
            raise ConnectionError(f"bad option reply magic {magic:#x}")
        return opt, rep, self.recv_exact(length) if length else b""

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; return the replies up to the final ACK; raise on error."""
        self.send_option(opt, data)
        out: list[tuple[int, bytes]] = []
        while True:
            _o, rep, payload = self.recv_option_reply()
            if rep & (1 << 31):
                raise OptionError(opt, rep, payload.decode(errors="replace"))
            if rep == P.REP_ACK:
                return out
            out.append((rep, payload))

    def starttls(self, context: ssl.SSLContext, server_hostname: str | None = None) -> None:
        self.option(P.OPT_STARTTLS)
        assert isinstance(self.sock, socket.socket)
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def structured_reply(self) -> None:
        self.option(P.OPT_STRUCTURED_REPLY)
        self.structured = True

    def list_exports(self) -> list[tuple[str, str]]:
        out = []
        for rep, payload in self.option(P.OPT_LIST):
            if rep == P.REP_SERVER:
                (n,) = P.S_U32.unpack_from(payload)
                out.append((payload[4 : 4 + n].decode(), payload[4 + n :].decode()))
        return out

    @staticmethod
    def _meta_payload(name: str, queries: list[str]) -> bytes:
        nb = name.encode()
        data = P.S_U32.pack(len(nb)) + nb + P.S_U32.pack(len(queries))
        for q in queries:
            qb = q.encode()
            data += P.S_U32.pack(len(qb)) + qb
        return data

    def set_meta_context(self, name: str, queries: list[str]) -> dict[int, str]:
        self.meta = {}
        for rep, payload in self.option(P.OPT_SET_META_CONTEXT, self._meta_payload(name, queries)):
            if rep == P.REP_META_CONTEXT:
                (cid,) = P.S_U32.unpack_from(payload)
                self.meta[cid] = payload[4:].decode()
        return self.meta

    def list_meta_context(self, name: str, queries: list[str]) -> list[str]:
        out: list[str] = []
        for rep, payload in self.option(P.OPT_LIST_META_CONTEXT, self._meta_payload(name, queries)):
            if rep == P.REP_META_CONTEXT:
                out.append(payload[4:].decode())
        return out

    def _info_payload(self, name: str, infos: list[int]) -> bytes:
        nb = name.encode()
        return (
            P.S_U32.pack(len(nb))
            + nb
            + P.S_U16.pack(len(infos))
            + b"".join(P.S_U16.pack(i) for i in infos)
        )

    def go(self, name: str, infos: list[int] | None = None, opt: int = P.OPT_GO) -> dict[int, bytes]:
        infos = [P.INFO_BLOCK_SIZE] if infos is None else infos
        got: dict[int, bytes] = {}
        for rep, payload in self.option(opt, self._info_payload(name, infos)):
            if rep == P.REP_INFO:
                (itype,) = P.S_U16.unpack_from(payload)
                got[itype] = payload[2:]
                if itype == P.INFO_EXPORT:
                    self.size, self.flags = struct.unpack(">QH", payload[2:12])
                elif itype == P.INFO_BLOCK_SIZE:
                    self.block_sizes = struct.unpack(">III", payload[2:14])
        return got

    def export_name(self, name: str) -> None:
        self.send_option(P.OPT_EXPORT_NAME, name.encode())
        self.size, self.flags = P.S_EXPORT_NAME_REPLY.unpack(self.recv_exact(10))
        if not self.no_zeroes:
            self.recv_exact(124)

    def open(
        self, name: str, structured: bool = True, meta: bool = True, tls: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
    ) -> NBDClient:
        self.hello()
        if tls is not None:
            self.starttls(tls, tls_hostname)
        if structured:
            self.structured_reply()
            if meta:
                self.set_meta_context(name, [P.BASE_ALLOCATION])
        self.go(name)
        return self

    # -- transmission ----------------------------------------------------------------------

    def send_request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> int:
        self._handle += 1
        h = self._handle
        self._pending[h] = (cmd, offset, length)
        self.send(P.S_REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, h, offset, length) + data)
        return h

    def recv_reply(self) -> Reply:
        (magic,) = P.S_U32.unpack(self.recv_exact(4))
        if magic == P.SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", self.recv_exact(12))
            cmd, _off, length = self._pending.pop(handle, (-1, 0, 0))
            r = Reply(handle, err)
            if cmd == P.CMD_READ and not err:
                r.data = bytearray(self.recv_exact(length))
            return r
        if magic != P.STRUCTURED_REPLY_MAGIC:
            raise ConnectionError(f"bad reply magic {magic:#x}")
        r = Reply(0)
        while True:
            if magic != P.STRUCTURED_REPLY_MAGIC:
                raise ConnectionError(f"bad reply magic {magic:#x}")
            flags, rtype, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length) if length else b""
            r.handle = handle
            cmd, off, rlen = self._pending.get(handle, (-1, 0, 0))
            if rtype == P.REPLY_TYPE_OFFSET_DATA:
                (o,) = P.S_U64.unpack_from(payload)
                if len(r.data) < rlen:
                    r.data = bytearray(rlen)
                r.data[o - off : o - off + len(payload) - 8] = payload[8:]
                r.chunks.append((rtype, o, len(payload) - 8))
            elif rtype == P.REPLY_TYPE_OFFSET_HOLE:
                o, n = struct.unpack(">QI", payload)
                if len(r.data) < rlen:
                    r.data = bytearray(rlen)
                r.holes.append((o, n))
                r.chunks.append((rtype, o, n))
            elif rtype == P.REPLY_TYPE_BLOCK_STATUS:
                for i in range(4, len(payload), 8):
                    r.extents.append(struct.unpack_from(">II", payload, i))
            elif rtype & (1 << 15):
                err, mlen = struct.unpack_from(">IH", payload)
                r.error = err
                r.message = payload[6 : 6 + mlen].decode(errors="replace")
            if flags & P.REPLY_FLAG_DONE:
                break
            (magic,) = P.S_U32.unpack(self.recv_exact(4))
        self._pending.pop(r.handle, None)
        if cmd == P.CMD_READ and not r.error and len(r.data) < rlen:
            r.data = bytearray(rlen)
        return r

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> Reply:
        self.send_request(cmd, offset, length, flags, data)
        return self.recv_reply()

    def _check(self, r: Reply) -> Reply:
        if r.error:
            raise NBDError(r.error, r.message)
        return r

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        return bytes(self._check(self.request(P.CMD_READ, offset, length, flags)).data)

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        self._check(self.request(P.CMD_WRITE, offset, len(data), flags, data))

    def flush(self) -> None:
        self._check(self.request(P.CMD_FLUSH))

    def trim(self, offset: int, length: int, flags: int = 0) -> None:
        self._check(self.request(P.CMD_TRIM, offset, length, flags))

    def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        self._check(self.request(P.CMD_WRITE_ZEROES, offset, length, flags))

    def cache(self, offset: int, length: int) -> None:
        self._check(self.request(P.CMD_CACHE, offset, length))

    def block_status(self, offset: int, length: int, flags: int = 0) -> list[tuple[int, int]]:
        return self._check(self.request(P.CMD_BLOCK_STATUS, offset, length, flags)).extents

    def disconnect(self) -> None:
        try:
            self.send(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.close()
