"""qemu-io and qemu-img against the virtua NBD server."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.interop

# (offset, length, pattern): aligned, unaligned, tiny, crossing 64 KiB and 1 MiB edges, big
PATTERNS = [
    (0, 512, 0x11),
    (4096, 4096, 0x22),
    (65535, 3, 0x33),
    (3 * 65536 - 100, 300, 0x44),
    (1048576 - 1, 2, 0x55),
    (2 * 1048576 + 7, 123457, 0x66),
    (8 * 1048576, 4 * 1048576, 0x77),
    (64 * 1048576 - 4096, 4096, 0x88),
    (20 * 1048576, 1, 0x99),
]


@pytest.fixture
def qemu_io(sh):
    def qemu_io(uri: str, *cmds: str, check: bool = True):
        args = ["qemu-io", "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        return sh(args + [uri], check=check)

    return qemu_io


def test_qemu_io_patterns(nbd_server, qemu_io):
    srv = nbd_server()
    uri = srv.uri()
    qemu_io(uri, *[f"write -P {p:#x} {o} {n}" for o, n, p in PATTERNS], "flush")
    # read back through a fresh connection, and through the unix socket
    for u in (uri, srv.unix_uri()):
        out = qemu_io(u, *[f"read -P {p:#x} {o} {n}" for o, n, p in PATTERNS]).stdout
        assert "Pattern verification failed" not in out, out
        assert out.count("read ") == len(PATTERNS)
    # untouched space reads as zeroes
    out = qemu_io(uri, "read -P 0 30M 1M").stdout
    assert "Pattern verification failed" not in out
    # zero and discard through qemu-io
    out = qemu_io(uri, "write -z 4096 4096", "read -P 0 4096 4096", "discard 0 512",
                   "write -f -P 0x5 0 512", "read -P 0x5 0 512").stdout
    assert "Pattern verification failed" not in out, out
    # the file on disk holds what was written
    with open(srv.directory / "disk.img", "rb") as f:
        f.seek(2 * 1048576 + 7)
        assert f.read(123457) == b"\x66" * 123457


def test_qemu_io_readonly_export(nbd_server, sh):
    srv = nbd_server()
    uri = srv.uri("disk@ro")
    out = sh(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xa5 0 1M", "-c", "read -P 0 1M 1M", uri]).stdout
    assert "Pattern verification failed" not in out
    assert out.count("read 1048576/1048576") == 2
    # qemu sees NBD_FLAG_READ_ONLY and refuses a read-write open
    p = sh(["qemu-io", "-f", "raw", "-c", "write -P 1 0 512", uri], check=False)
    assert p.returncode != 0
    assert "wrote" not in p.stdout
    assert "Permission denied" in p.stderr or "read-only" in p.stderr, p.stderr


def test_qemu_img_convert_and_compare(nbd_server, tmp_path, sh, qemu_io):
    srv = nbd_server()
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        for i in range(0, 64, 5):  # sparse source: data islands
            f.seek(i * 1048576 + 4096 * i)
            f.write(os.urandom(300_000))
    uri = srv.uri()
    sh(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    sh(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri])
    dst = tmp_path / "dst.img"
    sh(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.unix_uri(), str(dst)])
    sh(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(dst)])
    assert src.read_bytes() == dst.read_bytes()
    # a difference is detected
    qemu_io(uri, "write -P 0xee 10M 512")
    p = sh(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri], check=False)
    assert p.returncode == 1, p.stdout + p.stderr


def test_qemu_img_info_and_map(nbd_server, sh, qemu_io):
    srv = nbd_server()
    qemu_io(srv.uri(), "write -P 1 1M 64k")
    out = sh(["qemu-img", "info", srv.uri()]).stdout
    assert "64 MiB" in out
    out = sh(["qemu-img", "map", "--output=json", "-f", "raw", srv.uri()]).stdout
    assert '"data": true' in out and '"data": false' in out
