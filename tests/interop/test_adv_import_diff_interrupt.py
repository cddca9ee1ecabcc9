"""Adversarial: import-diff interrupted mid-apply, by SIGINT or SIGTERM."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli_support import VIRTUA, Serve, V

MAGIC = b"virtua-diff v1\n"
RECORD = struct.Struct(">cQQ")


@pytest.fixture
def v(tmp_path: Path) -> V:
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "64M", "--chunk-size", "64K")
    return cli


def _names(v: V) -> set[str]:
    return {x["name"] for x in v.json("volume", "list")}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_full_diff_interrupted_mid_apply_leaves_no_volume(v: V, sig: signal.Signals) -> None:
    serve = Serve(v.home)
    try:
        _interrupted(v, sig)
    finally:
        serve.stop()


def _interrupted(v: V, sig: signal.Signals) -> None:
    p = subprocess.Popen([*VIRTUA, "volume", "import-diff", "-", "p/x"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=v.env)
    assert p.stdin is not None
    p.stdin.write(MAGIC + json.dumps({"volume": "p/src", "from": None, "to": "s1", "size": 4 << 20}).encode() + b"\n")
    p.stdin.write(RECORD.pack(b"D", 0, 65536) + b"\x07" * 65536)
    p.stdin.write(RECORD.pack(b"D", 65536, 65536) + b"\x07" * 1000)  # and then it stalls
    p.stdin.flush()
    deadline = time.monotonic() + 60
    while "p/x" not in _names(v):  # the CLI made the volume and is writing into it
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert "p/x" not in _names(v), f"a half-restored volume is left after {sig.name}: {err.decode()}"


@pytest.mark.parametrize("tail", ["past-end", "truncated", "bad-tag"])
def test_a_failed_full_diff_into_an_existing_empty_volume_keeps_it(v: V, tmp_path: Path, tail: str) -> None:
    v.run("volume", "create", "p/e", "--size", "4M")
    body = RECORD.pack(b"D", 0, 4096) + b"\x01" * 4096
    if tail == "past-end":
        body += RECORD.pack(b"Z", 4 << 20, 4096)
    elif tail == "truncated":
        body += RECORD.pack(b"D", 8192, 4096) + b"\x02" * 100
    else:
        body += RECORD.pack(b"Q", 0, 0)
    diff = tmp_path / "bad.diff"
    diff.write_bytes(MAGIC + json.dumps({"volume": "p/s", "from": None, "to": "s1", "size": 4 << 20}).encode()
                     + b"\n" + body)
    r = v.run("volume", "import-diff", str(diff), "p/e", ok=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr.decode(), r.stderr.decode()
    assert "p/e" in _names(v), "the CLI did not make p/e: it must not remove it"
    r = v.run("volume", "import-diff", str(diff), "p/new", ok=False)
    assert r.returncode != 0
    assert "p/new" not in _names(v)
