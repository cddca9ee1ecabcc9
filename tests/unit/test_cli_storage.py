"""The `virtua` command as a user runs it: exit codes, one-line errors, JSON, round trips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cli_support import V


@pytest.fixture
def v(tmp_path: Path) -> V:
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "256M", "--chunk-size", "64K", "--overcommit", "4")
    return cli


def test_pool_info_and_list(v: V) -> None:
    info = v.json("pool", "info", "p")
    assert info["capacity"] == 256 << 20 and info["used"] == 0 and info["chunk_size"] == 65536
    pools = v.json("pool", "list")
    assert [p["name"] for p in pools] == ["p"]
    out = v.run("pool", "list").stdout.decode()
    assert "256M" in out


def test_bad_input_gets_one_line_errors(v: V) -> None:
    v.fails(2, "volume", "create", "p/bad!name", "--size", "1G", match="bad name")
    v.fails(2, "volume", "create", "p/x", "--size", "12Q", match="bad size")
    v.fails(2, "volume", "create", "p/x", "--size", "1000", match="multiple of 512")
    v.fails(3, "volume", "info", "p/nope", match="does not exist")
    v.fails(3, "volume", "create", "nopool/x", "--size", "1M", match="pool nopool does not exist")
    v.fails(6, "volume", "create", "p/huge", "--size", "2T", match="overcommit")
    v.fails(2, "snapshot", "create", "p/x", match="expected POOL/VOLUME@SNAPSHOT")
    v.run("volume", "create", "p/x", "--size", "1M")
    v.fails(4, "volume", "create", "p/x", "--size", "1M", match="already exists")
    v.fails(4, "pool", "create", "p", match="already exists")
    v.fails(2, "volume", "reset", "p/x", match="not a clone")
    v.fails(2, "volume", "resize", "p/x", "--size", "512K", match="--shrink")


def test_dependencies_refuse_then_recursive(v: V) -> None:
    v.run("volume", "create", "p/t", "--size", "4M")
    v.run("snapshot", "create", "p/t@s1")
    v.run("clone", "p/t@s1", "p/n", "--count", "3")
    v.fails(5, "volume", "rm", "p/t", match="p/t@s1")
    v.fails(5, "snapshot", "rm", "p/t@s1", match="p/n-1")
    removed = v.json("volume", "rm", "p/t", "--recursive", "--now")["removed"]
    assert set(removed) == {"p/t", "p/t@s1", "p/n-1", "p/n-2", "p/n-3"}
    assert v.json("volume", "list") == []
    assert v.json("pool", "check", "p")["ok"]


def test_resize_grow_and_forced_shrink(v: V, tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(os.urandom(1 << 20))
    v.run("volume", "import", str(img), "p/r")
    assert v.json("volume", "resize", "p/r", "--size", "2M")["size"] == 2 << 20
    v.run("volume", "resize", "p/r", "--size", "512K", "--force")
    v.run("volume", "resize", "p/r", "--size", "1M")
    out = tmp_path / "out"
    v.run("volume", "export", "p/r", str(out))
    data = out.read_bytes()
    assert data[: 512 << 10] == img.read_bytes()[: 512 << 10]
    assert data[512 << 10 :] == bytes(512 << 10), "grown space must read as zeros"


def test_import_export_round_trip_sparse(v: V, tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
        f.seek(3 << 20)
        f.write(os.urandom(1 << 20))
        f.seek(20 << 20)
        f.write(b"tail" * 1000)
    info = v.json("volume", "import", str(img), "p/disk")
    assert info["size"] == 32 << 20
    assert info["allocated"] <= (1 << 20) + (128 << 10), "zero runs must stay unallocated"
    out = tmp_path / "out.raw"
    v.run("volume", "export", "p/disk", str(out))
    assert out.read_bytes() == img.read_bytes()
    assert out.stat().st_blocks * 512 < 4 << 20, "export must stay sparse"
    # qcow2 both ways through qemu-img
    q = tmp_path / "out.qcow2"
    v.run("volume", "export", "p/disk", str(q), "--format", "qcow2")
    v.run("volume", "import", str(q), "p/fromq")
    out2 = tmp_path / "out2.raw"
    v.run("volume", "export", "p/fromq", str(out2))
    assert out2.read_bytes() == img.read_bytes()
    # stdin / stdout
    v.run("volume", "import", "-", "p/fromstdin", input=img.read_bytes())
    r = v.run("volume", "export", "p/fromstdin", "-")
    assert r.stdout == img.read_bytes()
    # with --size, stdin streams straight in (no spooled copy); more than that is refused
    data = img.read_bytes()
    v.run("volume", "import", "-", "p/streamed", "--size", str(len(data)), input=data)
    assert v.run("volume", "export", "p/streamed", "-").stdout == data
    assert v.json("volume", "info", "p/streamed")["size"] == len(data)
    r = v.run("volume", "import", "-", "p/toolong", "--size", "1M", input=data, ok=False)
    assert r.returncode == 2 and b"stdin holds more than --size 1M" in r.stderr, r.stderr
    assert "p/toolong" not in [x["name"] for x in v.json("volume", "list")], "nothing left behind"
    v.fails(2, "volume", "import", str(img), "p/x", "--size", "1M", match="--size is for an import from stdin")


def test_clone_reset_rebase_flatten(v: V, tmp_path: Path) -> None:
    img = tmp_path / "t.raw"
    base = os.urandom(2 << 20)
    img.write_bytes(base)
    v.run("volume", "import", str(img), "p/tmpl")
    v.run("snapshot", "create", "p/tmpl@v1")
    clones = v.json("clone", "p/tmpl@v1", "p/node", "--count", "2")["clones"]
    assert clones == ["p/node-1", "p/node-2"]
    info = v.json("volume", "info", "p/node-1")
    assert info["origin"] == "p/tmpl@v1" and info["shared"] == 2 << 20 and info["unique"] == 0
    assert v.json("volume", "info", "p/tmpl")["children"] == ["p/node-1", "p/node-2"]
    # implicit snapshot when cloning a volume
    assert v.json("clone", "p/tmpl", "p/solo")["origin"] == "p/tmpl@clone-solo"
    # upgrade the template, snapshot v2, rebase node-1 onto it; reset node-2
    patch = tmp_path / "patch"
    v.run("volume", "export", "p/tmpl", str(patch))
    v.run("volume", "flatten", "p/solo")
    assert v.json("volume", "info", "p/solo")["origin"] is None
    v.run("snapshot", "create", "p/tmpl@v2")
    v.json("volume", "rebase", "p/node-1", "p/tmpl@v2")
    assert v.json("volume", "info", "p/node-1")["origin"] == "p/tmpl@v2"
    v.run("volume", "reset", "p/node-2")
    out = tmp_path / "n2"
    v.run("volume", "export", "p/node-2", str(out))
    assert out.read_bytes() == base
    assert v.json("pool", "check", "p")["ok"]


def test_pool_full_write_fails_with_enospc_message(v: V, tmp_path: Path) -> None:
    v.run("pool", "create", "tiny", "--capacity", "1M", "--chunk-size", "64K")
    img = tmp_path / "big"
    img.write_bytes(os.urandom(2 << 20))
    v.fails(6, "volume", "import", str(img), "tiny/big", match="full")
    assert v.json("volume", "list", "tiny") == [], "a failed import leaves nothing behind"
    assert v.json("pool", "check", "tiny")["ok"]


def test_pool_warns_past_80_percent(v: V, tmp_path: Path) -> None:
    v.run("pool", "create", "small", "--capacity", "1M", "--chunk-size", "64K")
    assert "warning" not in v.json("pool", "info", "small")
    img = tmp_path / "fill"
    img.write_bytes(os.urandom(14 * 65536))  # 14 of 16 chunks: 87.5%
    v.run("volume", "import", str(img), "small/fill")
    info = v.json("pool", "info", "small")
    assert "87% full" in info["warning"] or "88% full" in info["warning"], info
    r = v.run("pool", "info", "small")
    assert "warning:" in r.stderr.decode() and "full" in r.stderr.decode()
