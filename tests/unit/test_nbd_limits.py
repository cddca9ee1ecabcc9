"""One source cannot lock others out of `virtua serve`: a flood of 1,000 connections that
never finish the handshake, from one address (or one local process), leaves established
clients and new clients from other addresses working, on the NBD port, the NBD unix
socket and the admin API's TCP listener. Loopback only: 127.0.0.2 floods, 127.0.0.1 and
127.0.0.3 are the others. Real clients (nbdinfo, qemu-io) are the positive controls."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli_support import free_port
from virtua.edge.limits import Admission, ConnectionLimits, source_of
from virtua.errors import InvalidArgument
from virtua.nbd import proto as P
from virtua.nbd.client import NBDClient, NBDError
from virtua.nbd.exports import DirectoryProvider
from virtua.nbd.testing import ServerThread
from virtua.pki.credentials import MANAGER, Credentials, PeerRule
from virtua.storage.device import FileDevice

FLOOD = 1000
FLOODER = "127.0.0.2"
OTHER = "127.0.0.3"



def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"required client binary {name!r} is not installed"
    return path


class Serve:
    """A real `virtua serve` with pool p and a 16 MiB volume p/d."""

    def __init__(self, home: Path, *flags: str) -> None:
        self.home = home
        self.env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200")
        for args in (["pool", "create", "p", "--capacity", "256M"], ["volume", "create", "p/d", "--size", "16M"]):
            subprocess.run([sys.executable, "-m", "virtua.cli", *args], env=self.env, check=True, capture_output=True)
        self.port, self.api_port = free_port(), free_port()
        self.log_path = home / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"127.0.0.1:{self.port}",
             "--api-listen", f"127.0.0.1:{self.api_port}", *flags],
            env=self.env, stdout=subprocess.PIPE, stderr=open(self.log_path, "w"), text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("VIRTUA_READY"), line + self.log()
        self.nbd_socket = str(home / "nbd.sock")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[type[Serve]]:
    started: list[Serve] = []

    def start(*flags: str) -> Serve:
        s = Serve(tmp_path / f"home{len(started)}", *flags)
        started.append(s)
        return s

    yield start  # type: ignore[misc]
    for s in started:
        s.stop()
        assert s.proc.returncode == 0, s.log()
        assert "Traceback" not in s.log(), s.log()


def flood(port: int, source: str = FLOODER, count: int = FLOOD) -> list[socket.socket]:
    """`count` TCP connections from `source` that never say a word."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind((source, 0))
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def flood_unix(path: str, count: int = FLOOD) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        s.connect_ex(path)
        socks.append(s)
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def nbd_from(source: str, port: int, timeout: float = 5) -> NBDClient:
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return NBDClient(s)


def refused(c: NBDClient) -> bool:
    """True if the server closed the connection without a word (no greeting)."""
    try:
        return c.sock.recv(18) == b""
    except ConnectionResetError:
        return True
    finally:
        c.close()


def run(*args: str, timeout: float = 20) -> str:
    r = subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
    return r.stdout


def test_idle_handshake_flood_locks_nobody_out(serve: type[Serve]) -> None:
    srv = serve()
    uri = f"nbd://127.0.0.1:{srv.port}/p/d"
    established = NBDClient.connect("127.0.0.1", srv.port)
    established.open("p/d")
    established.write(0, b"E" * 4096)
    socks = flood(srv.port)
    try:
        time.sleep(1.0)  # let the server accept (and refuse) the whole flood
        t0 = time.monotonic()
        # the established client keeps working
        established.write(4096, b"F" * 4096)
        assert established.read(0, 8192) == b"E" * 4096 + b"F" * 4096
        # new clients from other addresses are served, promptly
        assert "p/d" in run("nbdinfo", "--list", f"nbd://127.0.0.1:{srv.port}")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 64k 64k", "-c", "read -P 0x5a 64k 64k", uri)
        other = nbd_from(OTHER, srv.port)
        other.open("p/d")
        assert other.read(65536, 4096) == b"\x5a" * 4096
        other.disconnect()
        assert time.monotonic() - t0 < 8, "clients from other addresses were held up"
        # the flooding address itself is refused now
        assert refused(nbd_from(FLOODER, srv.port))
    finally:
        close_all(socks)
    # and is served again once its connections are gone (bounded wait)
    deadline = time.monotonic() + 10
    while True:
        c = nbd_from(FLOODER, srv.port)
        try:
            c.open("p/d")
            break
        except (ConnectionError, OSError):
            c.close()
            assert time.monotonic() < deadline, "the flooding address is still refused"
            time.sleep(0.2)
    assert c.read(0, 4096) == b"E" * 4096
    c.disconnect()
    established.disconnect()
    # one log line per refused source, not one per connection
    refusals = [line for line in srv.log().splitlines() if "refusing new connections from" in line]
    assert len(refusals) == 1 and FLOODER in refusals[0], refusals


def test_unix_socket_flood_from_one_process_spares_other_processes(serve: type[Serve]) -> None:
    srv = serve()
    socks = flood_unix(srv.nbd_socket)
    try:
        time.sleep(1.0)
        # qemu-io is another process: another source
        run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4k", "-c", "read -P 0x33 0 4k",
            f"nbd+unix:///p/d?socket={srv.nbd_socket}")
    finally:
        close_all(socks)
    refusals = [line for line in srv.log().splitlines() if "refusing new connections from unix pid" in line]
    assert len(refusals) == 1 and f"pid {os.getpid()} " in refusals[0], refusals


def test_handshake_timeout_and_per_source_limit_are_configurable(serve: type[Serve]) -> None:
    srv = serve("--handshake-timeout", "1", "--max-connections-per-source", "4")
    # an idle connection is dropped after about a second, not 30
    idle = nbd_from(FLOODER, srv.port, timeout=10)
    assert len(idle.recv_exact(18)) == 18  # the greeting
    t0 = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        assert idle.sock.recv(1) == b""
    assert 0.5 < time.monotonic() - t0 < 5
    idle.close()
    # four established connections from one address, and no fifth
    clients = []
    for _ in range(4):
        c = nbd_from(FLOODER, srv.port)
        c.open("p/d")
        clients.append(c)
    assert refused(nbd_from(FLOODER, srv.port))
    other = nbd_from(OTHER, srv.port)
    other.open("p/d")
    other.disconnect()
    for c in clients:
        c.disconnect()


def closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes `sock`, which sends nothing (at most `limit`)."""
    sock.settimeout(limit)
    t0 = time.monotonic()
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        try:
            assert sock.recv(1) == b"", "the server spoke first"
        except TimeoutError:
            raise AssertionError(f"an idle connection was still open after {limit} s") from None
    return time.monotonic() - t0


def test_api_tcp_listener_drops_idle_connections_and_limits_a_source(serve: type[Serve]) -> None:
    """The API's TCP listener speaks TLS only; the limits count a connection from its TCP
    accept, before the TLS handshake: idle connections that never send a ClientHello are
    dropped after the handshake timeout, like requests that drip in after it."""
    srv = serve("--handshake-timeout", "1", "--max-connections-per-source", "8")
    admin = Credentials(srv.home / "pki" / "admin").check()
    base = f"https://127.0.0.1:{srv.api_port}"
    socks = flood(srv.api_port)
    drip = None
    try:
        time.sleep(0.5)
        with httpx.Client(verify=admin.client_context(MANAGER), timeout=5) as http:
            r = http.get(f"{base}/v1/status")
        assert r.status_code == 200 and r.json()["pid"] == srv.proc.pid
        cli = subprocess.run([sys.executable, "-m", "virtua.cli", "--api", base, "--cert", str(admin.dir),
                              "volume", "list", "--json"], env=srv.env, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and "p/d" in cli.stdout, cli.stderr
        # a raw TCP connection that never starts its TLS handshake: dropped after the
        # handshake timeout (about a second), not kept for as long as TLS would wait
        with socket.create_connection(("127.0.0.1", srv.api_port), source_address=(OTHER, 0)) as idle:
            assert closed_within(idle, 8) < 5
        # slow headers over TLS: a byte every 0.3 s never finishes a request
        raw = socket.create_connection(("127.0.0.1", srv.api_port), source_address=(OTHER, 0), timeout=10)
        t0 = time.monotonic()
        drip = admin.client_context(MANAGER).wrap_socket(raw, server_hostname="127.0.0.1")
        dropped = False
        for byte in b"GET /v1/status HTTP/1.1\r\nHost: x\r\n":
            try:
                drip.send(bytes([byte]))
            except OSError:
                dropped = True
                break
            time.sleep(0.3)
            if time.monotonic() - t0 > 6:
                break
        if not dropped:
            try:
                dropped = drip.recv(1) == b""
            except OSError:  # reset, or TLS cut off without its close_notify
                dropped = True
        assert dropped, "a request dripping in byte by byte was never cut off"
        assert time.monotonic() - t0 < 5
        # the flood's admitted connections are gone after the timeout: the source may connect again
        time.sleep(0.5)
        transport = httpx.HTTPTransport(local_address=FLOODER, verify=admin.client_context(MANAGER))
        with httpx.Client(transport=transport, timeout=5) as http:
            assert http.get(f"{base}/v1/status").status_code == 200
    finally:
        close_all(socks)
        if drip is not None:
            drip.close()
    refusals = [line for line in srv.log().splitlines() if "api: refusing new connections from" in line]
    assert len(refusals) == 1 and FLOODER in refusals[0], refusals


def test_bad_limits_are_one_line_errors(tmp_path: Path) -> None:
    env = dict(os.environ, VIRTUA_HOME=str(tmp_path / "home"))
    for flag, value in (("--handshake-timeout", "0"), ("--handshake-timeout", "-5"),
                        ("--max-connections-per-source", "0")):
        r = subprocess.run([sys.executable, "-m", "virtua.cli", "serve", "--no-agent", flag, value],
                           env=env, capture_output=True, text=True, timeout=60)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and flag.lstrip("-") in lines[0], r.stderr


# ---------------------------------------------------------------------- the server's own faults

EIO_AT = 0x10000  # an I/O error: the client's answer is EIO, its connection stays
BUG_AT = 0x20000  # a bug (KeyError): logged with its traceback, the connection dropped


class FaultyDevice(FileDevice):
    def readinto(self, offset: int, buf: memoryview) -> None:
        if offset == EIO_AT:
            raise OSError(errno.EIO, "injected I/O error")
        if offset == BUG_AT:
            raise KeyError("a bug in the device")
        super().readinto(offset, buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        if offset == BUG_AT:
            raise TypeError("another bug in the device")
        super().write(offset, data, fua)


class FaultyProvider(DirectoryProvider):
    def open_export(self, name: str) -> FileDevice | None:
        if name == "broken":
            raise RuntimeError("a bug in the provider")
        path = self._path(name)
        return FaultyDevice(path) if path else None


def test_server_faults_are_logged_and_drop_only_that_connection(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    with caplog.at_level(logging.INFO, logger="virtua.nbd"), ServerThread(FaultyProvider(str(tmp_path))) as st:
        assert st.port is not None
        bystander = NBDClient.connect(port=st.port).open("disk.img")
        c = NBDClient.connect(port=st.port).open("disk.img")
        # a device's I/O error is the client's answer, and the connection goes on
        with pytest.raises(NBDError) as err:
            c.read(EIO_AT, 4096)
        assert err.value.err == P.NBD_EIO
        assert c.read(0, 4096) == bytes(4096)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        # a bug is not made into an errno: logged, and this connection (only) dropped
        with pytest.raises((ConnectionError, OSError)):
            c.read(BUG_AT, 4096)
        c.close()
        w = NBDClient.connect(port=st.port).open("disk.img")
        with pytest.raises((ConnectionError, OSError)):
            w.write(BUG_AT, b"x" * 4096)
        w.close()
        assert bystander.read(0, 4096) == bytes(4096)
        bystander.write(4096, b"y" * 4096)
        # a provider's bug during the handshake: logged, the connection dropped
        b = NBDClient.connect(port=st.port)
        with pytest.raises((ConnectionError, OSError)):
            b.open("broken")
        b.close()
        bystander.disconnect()
    logged = {r.exc_info[0] for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info}
    assert {KeyError, TypeError, RuntimeError} <= logged, [r.getMessage() for r in caplog.records]
    assert any("internal error on export 'disk.img'" in r.getMessage() for r in caplog.records)


def test_agent_api_limits_a_source(serve: type[Serve], tmp_path: Path) -> None:
    """A joined agent's API (mTLS, the manager's or the admin's certificate): one source's
    flood of unfinished TCP connections is refused past its limit, others are served."""
    srv = serve()
    admin = Credentials(srv.home / "pki" / "admin").check()
    token = tmp_path / "h1.token"
    subprocess.run([sys.executable, "-m", "virtua.cli", "host", "join-token", "--ttl", "10m", "--output", str(token)],
                   env=srv.env, check=True, capture_output=True, timeout=60)
    port = free_port()
    errpath = tmp_path / "agent.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtua.cli", "--home", str(tmp_path / "agent"), "agent", "--no-network",
         "--name", "h1", "--listen", f"127.0.0.1:{port}", "--manager", f"https://127.0.0.1:{srv.api_port}",
         "--join-token-file", str(token)],
        env=srv.env, stdout=subprocess.PIPE, stderr=open(errpath, "w"), text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("VIRTUA_AGENT_READY"), line + errpath.read_text()
        base = f"https://127.0.0.1:{port}"
        socks = flood(port)
        try:
            time.sleep(1.0)
            with httpx.Client(verify=admin.client_context(PeerRule("host", "h1")), timeout=5) as http:
                r = http.get(f"{base}/v1/health")
            assert r.status_code == 200 and r.json()["name"] == "h1"
            transport = httpx.HTTPTransport(local_address=FLOODER, verify=admin.client_context(PeerRule("host", "h1")))
            with pytest.raises(httpx.TransportError), httpx.Client(transport=transport, timeout=5) as http:
                http.get(f"{base}/v1/health")
        finally:
            close_all(socks)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    log = errpath.read_text()
    refusals = [line for line in log.splitlines() if "agent api: refusing new connections from" in line]
    assert len(refusals) == 1 and FLOODER in refusals[0], log
    assert "Traceback" not in log, log


def test_flood_from_many_sources_does_not_lock_new_clients_out(serve: type[Serve]) -> None:
    # 64 addresses x 16 idle handshakes each: every source within its own limit, together
    # eight times the budget of unfinished handshakes. The oldest make room for the newest.
    srv = serve()
    socks: list[socket.socket] = []
    try:
        for i in range(64):
            socks += flood(srv.port, source=f"127.0.1.{i + 1}", count=16)
        time.sleep(1.0)
        t0 = time.monotonic()
        assert "p/d" in run("nbdinfo", "--list", f"nbd://127.0.0.1:{srv.port}")
        run("qemu-io", "-f", "raw", "-c", "read 0 4k", f"nbd://127.0.0.1:{srv.port}/p/d")
        assert time.monotonic() - t0 < 8
    finally:
        close_all(socks)
    log = srv.log()
    assert log.count("unfinished handshakes in all (limit 128): dropping the oldest") == 1, log
    assert "refusing new connections" not in log, log


# ---------------------------------------------------------------------- the counts themselves


class Conn:
    def __init__(self) -> None:
        self.dropped = False

    def drop(self) -> None:
        self.dropped = True


class Peer:
    def __init__(self, host: str) -> None:
        self.host = host

    def get_extra_info(self, name: str) -> object:
        return (self.host, 1234, 0, 0) if name == "peername" else None


@pytest.mark.parametrize(("host", "source"), [
    ("127.0.0.2", "127.0.0.2"),
    ("::ffff:10.1.2.3", "10.1.2.3"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
])
def test_source_of(host: str, source: str) -> None:
    assert source_of(Peer(host)) == source


def test_admission_counts_refuses_and_evicts_oldest(caplog: pytest.LogCaptureFixture) -> None:
    lim = ConnectionLimits(max_connections=10, max_connections_per_source=3, max_handshakes=4,
                           max_handshakes_per_source=2)
    adm = Admission(lim, logging.getLogger("virtua.test"), "t")
    a1, a2, a3 = Conn(), Conn(), Conn()
    assert adm.admit(a1, "a") and adm.admit(a2, "a")
    assert not adm.admit(a3, "a")  # two handshakes from a: its limit
    adm.handshake_done(a1)
    assert adm.admit(a3, "a") and adm.counts("a") == (3, 2)
    adm.handshake_done(a2)
    assert not adm.admit(Conn(), "a")  # three connections from a: its limit
    b = [Conn() for _ in range(2)]
    c = [Conn() for _ in range(2)]
    assert all(adm.admit(x, "b") for x in b) and adm.admit(c[0], "c")  # 4 handshakes: the budget
    assert adm.admit(c[1], "c")  # the oldest unfinished handshake (a3) makes room
    assert a3.dropped and not any(x.dropped for x in (a1, a2, *b, c[0]))
    adm.release(a3)  # its connection_lost comes later: counted once
    assert adm.counts("a") == (2, 0) and adm.handshakes == 4 and adm.connections == 6
    for x in (a1, a2, *b, *c):
        adm.release(x)
    assert adm.connections == 0 and adm.handshakes == 0
    assert adm.refused == 2 and adm.evicted == 1
    refusals = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert len(refusals) == 1 and "from a" in refusals[0]  # once per source


@pytest.mark.parametrize("bad", [
    {"max_connections": 0}, {"max_connections_per_source": True}, {"handshake_timeout": 0},
    {"handshake_timeout": float("nan")}, {"handshake_timeout": 1e9},
])
def test_bad_limits_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument, match="bad "):
        ConnectionLimits(**bad)  # type: ignore[arg-type]
