"""Tables never cut a name (piped: plain columns; on an 80-column terminal: columns that do
not fit are left out, not truncated); people read human sizes; every --help documents --json
and shows flags without `<bool>`; shell completion is on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_support import VIRTUA, V

LONG = ["debian-bookworm-cloud-amd64-generic-a", "debian-bookworm-cloud-amd64-generic-b"]


@pytest.fixture
def v(tmp_path: Path) -> V:
    cli = V(tmp_path / "home")
    cli.env["COLUMNS"] = "80"
    cli.run("pool", "create", "p", "--capacity", "1G", "--overcommit", "40")
    for name in LONG:
        cli.run("volume", "create", f"p/{name}", "--size", "10G")
    return cli


def test_names_are_never_cut(v: V) -> None:
    piped = v.run("volume", "list").stdout.decode()
    for name in LONG:
        assert f"p/{name}" in piped, piped
    assert "…" not in piped and "ALLOCATED" in piped and "SNAPSHOTS" in piped, piped
    pools = v.run("pool", "list").stdout.decode()
    assert "PROVISIONED" in pools and "…" not in pools, pools
    # a real 80-column terminal (a pty): names whole, what does not fit is left out, and said so
    cmd = " ".join([*VIRTUA, "volume", "list"])
    r = subprocess.run(["script", "-qec", f"stty cols 80; {cmd}", "/dev/null"], capture_output=True,
                       env=dict(v.env, TERM="xterm"), timeout=60)
    tty = r.stdout.decode(errors="replace")
    for name in LONG:
        assert f"p/{name}" in tty, tty
    assert "…" not in tty and "left out to fit 80 columns" in tty, tty


def test_error_messages_use_human_sizes(v: V) -> None:
    line = v.fails(6, "volume", "create", "p/huge", "--size", "1P", match="1 PiB more")
    assert "= 40 GiB" in line and "20 GiB provisioned" in line, line


def test_every_help_documents_json_and_shows_no_bool(v: V) -> None:
    script = (
        "import sys\n"
        "from virtua.cli.main import main\n"
        "for argv in [a.split() for a in sys.argv[1:]]:\n"
        "    print('=====', ' '.join(argv), flush=True)\n"
        "    try:\n"
        "        main([*argv, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    sys.stdout.flush()\n"
    )
    commands = [
        "", "pool create", "pool list", "pool info", "pool check", "pool rm", "volume create", "volume list",
        "volume info", "volume status", "volume resize", "volume rm", "volume reset", "volume rebase",
        "volume flatten", "volume import", "volume export", "clone", "snapshot create", "snapshot list",
        "snapshot rm", "snapshot rollback",
    ]
    r = subprocess.run([sys.executable, "-c", script, *commands], capture_output=True, text=True,
                       env=dict(os.environ, COLUMNS="100"), timeout=120)
    pages = r.stdout.split("===== ")[1:]
    assert len(pages) == len(commands), r.stdout + r.stderr
    for page in pages:
        name = page.splitlines()[0]
        assert "--json" in page, f"`{name} --help` does not document --json:\n{page}"
        assert "<bool>" not in page, f"`{name} --help` shows <bool>:\n{page}"
    assert "--install-completion" in pages[0], pages[0]
