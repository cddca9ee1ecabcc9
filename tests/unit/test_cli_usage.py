"""Usage errors are one line on stderr with the right exit code, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.cli_support import V, free_port


def one_line(v: V, code: int, *args: str, match: str) -> None:
    r = v.run(*args, ok=False, timeout=60)
    err = r.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert r.returncode == code, (args, r.returncode, err)
    assert len(lines) == 1 and lines[0].startswith("virtua: error: "), (args, err)
    assert match in lines[0], (args, err)


@pytest.fixture
def v(tmp_path: Path) -> V:
    return V(tmp_path / "home")


def test_version(v: V) -> None:
    r = v.run("--version")
    assert r.stdout.decode().strip().startswith("virtua 0.") and not r.stderr


def test_usage_errors_are_one_line(v: V, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    one_line(v, 2, "volme", match="No such command 'volme'")
    one_line(v, 2, "volume", "create", "p/x", match="Missing option '--size'")
    one_line(v, 2, "volume", "create", "p/x", "--size", "1M", "--bogus", match="--bogus")
    one_line(v, 2, "pool", "create", "p", "--path", str(a_file), match="is not a directory")
    one_line(v, 3, "serve", "--tls", "on", "--tls-psk", str(tmp_path / "missing.psk"), match="no such file")
    one_line(v, 2, "serve", "--tls-psk", str(a_file), match="--tls is auto")
    one_line(v, 3, "volume", "import", str(tmp_path / "missing.img"), "p/x", match="no such file")


def test_serve_on_a_port_in_use(v: V) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        one_line(v, 8, "serve", "--no-agent", "--listen", f"127.0.0.1:{port}",
                 "--api-listen", f"127.0.0.1:{free_port()}", match="address already in use")
        one_line(v, 8, "serve", "--no-agent", "--listen", f"127.0.0.1:{free_port()}",
                 "--api-listen", f"127.0.0.1:{port}", match="address already in use")
