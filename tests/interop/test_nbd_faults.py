"""A bug of the server's (or of its export provider's) against real clients: libnbd (the
system interpreter's bindings) and nbdinfo. A device's expected failure (EIO from the disk)
is that request's answer and the connection goes on; an unexpected exception (TypeError,
AttributeError, KeyError: a bug of ours) is logged with its traceback and drops that
connection only, while a client of another export keeps working. The server runs in this
process (virtua.nbd.testing.ServerThread) so that its log records can be inspected."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import SYSTEM_PYTHON
from virtua.nbd.exports import DirectoryProvider
from virtua.nbd.testing import ServerThread
from virtua.storage.device import FileDevice

pytestmark = pytest.mark.interop

EIO_AT = 0x10000  # the disk's I/O error: EIO to the client, its connection stays
BUG_AT = 0x20000  # a TypeError in the read path: traceback in the log, connection dropped
LOST_AT = 0x80000  # a zero-copy read whose data the file cannot supply once its header is out
SIZE = 1 << 20
Run = Callable[..., subprocess.CompletedProcess[str]]


class FaultyDevice(FileDevice):
    fail_flush = False
    lost_fd = -1  # a directory: sendfile and pread from it fail (EINVAL, EISDIR)

    def physical_view(self, pos: int, length: int) -> memoryview | None:
        return None  # no mapping: the zero-copy path is sendfile(2), then pread(2)

    def physical_run(self, offset: int, length: int) -> tuple[int, int] | None:
        if offset == LOST_AT:
            return self.lost_fd, 0
        return super().physical_run(offset, length)

    def close(self) -> None:
        if self.lost_fd >= 0:
            os.close(self.lost_fd)
            self.lost_fd = -1
        super().close()

    def readinto(self, offset: int, buf: memoryview) -> None:
        if offset == EIO_AT:
            raise OSError(errno.EIO, "injected I/O error")
        if offset == BUG_AT:
            raise TypeError("injected bug in the read path")
        super().readinto(offset, buf)

    def flush(self) -> None:
        if self.fail_flush:
            raise AttributeError("injected bug in flush")
        super().flush()


class FaultyProvider(DirectoryProvider):
    """bug.img has the faulty device; policy-bug.img's policy check and info-bug.img's
    listing (asked for its description) raise bugs; good.img is a plain file."""

    listing_bug = False

    def open_export(self, name: str) -> FileDevice | None:
        if name != "bug.img":
            return super().open_export(name)  # type: ignore[return-value]
        with self._lock:
            dev = self._devices.get(name)
            if dev is None:
                path = self._path(name)
                if path is None:
                    return None
                dev = self._devices[name] = FaultyDevice(path)
                dev.lost_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            return dev

    def allowed(self, name: str, identity: str | None) -> bool:
        if name == "policy-bug.img":
            raise AttributeError("injected bug in the policy")
        return super().allowed(name, identity)

    def list_exports(self) -> list[tuple[str, str]]:
        exports = super().list_exports()
        if self.listing_bug:
            raise KeyError("injected bug in the listing")
        return exports


@pytest.fixture
def server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[ServerThread]:
    d = tmp_path / "exports"
    d.mkdir()
    for name in ("good.img", "bug.img", "policy-bug.img"):
        with open(d / name, "wb") as f:
            f.truncate(SIZE)
    provider = FaultyProvider(str(d))
    with caplog.at_level(logging.INFO, logger="virtua.nbd"), ServerThread(provider) as st:
        yield st
    provider.close()


def libnbd(tmp_path: Path, script: str, *args: str) -> dict[str, object]:
    path = tmp_path / "client.py"
    path.write_text(textwrap.dedent(script))
    p = subprocess.run([SYSTEM_PYTHON, str(path), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[tuple[type[BaseException], str]]:
    return [(r.exc_info[0], r.getMessage()) for r in caplog.records
            if r.levelno >= logging.ERROR and r.exc_info and r.exc_info[0] is not None]


CLIENTS = """\
import json, sys
import nbd

port, eio_at, bug_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}

def connect(export):
    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{port}/{export}")
    return h

def pread(h, offset):
    try:
        return h.pread(4096, offset) == bytes(4096)
    except nbd.Error as e:
        return {"errno": e.errno, "error": e.string, "dead": bool(h.aio_is_dead() or h.aio_is_closed())}

good = connect("good.img")  # the bystander, connected before the bug
bad = connect("bug.img")
out["eio"] = pread(bad, eio_at)
out["after_eio"] = pread(bad, 0)
out["bad_alive"] = not (bad.aio_is_dead() or bad.aio_is_closed())
out["bug"] = pread(bad, bug_at)
good.pwrite(b"g" * 4096, 8192)
out["good_after"] = good.pread(4096, 8192) == b"g" * 4096
good.flush()
good.shutdown()
fresh = connect("bug.img")  # the export itself still serves a new connection
out["fresh"] = pread(fresh, 0)
fresh.shutdown()
print(json.dumps(out))
"""


def test_a_device_bug_drops_only_its_connection_and_eio_stays_an_answer(
        server: ServerThread, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = libnbd(tmp_path, CLIENTS, str(server.port), str(EIO_AT), str(BUG_AT))
    # the disk's I/O error is the client's answer, and its connection goes on
    assert isinstance(out["eio"], dict) and out["eio"]["errno"] == "EIO" and not out["eio"]["dead"], out
    assert out["after_eio"] is True and out["bad_alive"] is True, out
    # the bug: not made into an errno, the connection is gone
    bug = out["bug"]
    assert isinstance(bug, dict) and bug["dead"], out
    # the other export's client, connected all along, still reads and writes; so does a new one
    assert out["good_after"] is True and out["fresh"] is True, out
    logged = tracebacks(caplog)
    assert [m for t, m in logged if t is TypeError and "internal error on export 'bug.img'" in m], logged
    assert not [m for t, m in logged if t is OSError], "an expected device error is not a traceback"


def test_a_policy_bug_is_logged_not_passed_for_a_refusal(
        server: ServerThread, caplog: pytest.LogCaptureFixture, sh: Run) -> None:
    uri = f"nbd://127.0.0.1:{server.port}"
    p = sh(["nbdinfo", f"{uri}/policy-bug.img"], check=False)
    assert p.returncode != 0
    logged = tracebacks(caplog)
    assert [m for t, m in logged if t is AttributeError and "handshake error" in m], logged
    # it was not reported as the policy's answer
    assert not [r for r in caplog.records if "may not open export 'policy-bug.img'" in r.getMessage()]
    assert "good.img" in sh(["nbdinfo", f"{uri}/good.img"]).stdout


def test_a_listing_bug_during_info_is_logged(
        server: ServerThread, caplog: pytest.LogCaptureFixture, sh: Run) -> None:
    uri = f"nbd://127.0.0.1:{server.port}/good.img"
    assert sh(["nbdinfo", uri]).returncode == 0
    server.provider.listing_bug = True  # type: ignore[attr-defined]
    # nbdinfo asks for the export's description (NBD_INFO_DESCRIPTION): the listing behind it fails
    p = sh(["nbdinfo", uri], check=False)
    assert p.returncode != 0
    logged = tracebacks(caplog)
    assert [m for t, m in logged if t is KeyError and "handshake error" in m], logged


def test_a_bug_flushing_on_close_is_logged_with_its_traceback(
        server: ServerThread, tmp_path: Path, caplog: pytest.LogCaptureFixture, sh: Run) -> None:
    sh(["qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", f"nbd://127.0.0.1:{server.port}/bug.img"])
    dev = server.provider.open_export("bug.img")
    assert isinstance(dev, FaultyDevice)
    dev.fail_flush = True
    server.stop()
    logged = tracebacks(caplog)
    assert [m for t, m in logged if t is AttributeError and "flushing a device on close" in m], logged


SENDFILE = """\
import json, sys
import nbd

port, lost_at = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(f"nbd://127.0.0.1:{port}/bug.img")
out = {"tries": 0}
# the zero-copy path is taken once the socket's send buffer has room for the whole
# reply: bulk reads grow it (TCP autotuning); until then the copy path answers
for out["tries"] in range(1, 200):
    try:
        h.pread(256 * 1024, lost_at)
    except nbd.Error as e:
        out["error"] = e.string
        break
    for off in range(0, 1 << 20, 256 * 1024):
        h.pread(256 * 1024, off)
out["dead"] = bool(h.aio_is_dead() or h.aio_is_closed())
print(json.dumps(out))
"""


def test_a_read_that_fails_after_its_header_is_sent_is_logged(
        server: ServerThread, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = libnbd(tmp_path, SENDFILE, str(server.port), str(LOST_AT))
    assert "error" in out and out["dead"] is True, out  # nothing else can be done with the stream
    assert [r for r in caplog.records if r.levelno == logging.WARNING
            and "read failed after its reply header was sent" in r.getMessage()], \
        [r.getMessage() for r in caplog.records]


BURST = """\
import json, sys
import nbd

port, eio_at, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(f"nbd://127.0.0.1:{port}/bug.img")
errors = []
for _ in range(n):
    try:
        h.pread(4096, eio_at)
    except nbd.Error as e:
        errors.append(e.errno)
out = {"errors": errors, "then": h.pread(4096, 0) == bytes(4096)}
h.shutdown()
print(json.dumps(out))
"""


def test_device_errors_are_answered_each_time_and_logged_at_a_limited_rate(
        server: ServerThread, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "injected I/O error" in r.getMessage()]

    out = libnbd(tmp_path, BURST, str(server.port), str(EIO_AT), "20")
    assert out == {"errors": ["EIO"] * 20, "then": True}, out
    logged = warnings()
    assert len(logged) == 1 and "export 'bug.img': read failed" in logged[0], logged
    assert server.server is not None
    server.server.device_error_interval = 0.0  # the next one is logged, with the count of the others
    out = libnbd(tmp_path, BURST, str(server.port), str(EIO_AT), "1")
    assert out == {"errors": ["EIO"], "then": True}, out
    logged = warnings()
    assert len(logged) == 2 and "(19 more device errors since the last one logged)" in logged[1], logged
    assert not tracebacks(caplog)
