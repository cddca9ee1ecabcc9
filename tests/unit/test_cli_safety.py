"""Commands that could destroy data by surprise refuse instead, with one line and the right code."""

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


def test_rebase_refuses_a_volume_that_is_not_a_clone(v: V, tmp_path: Path) -> None:
    img = tmp_path / "data"
    img.write_bytes(os.urandom(1 << 20))
    v.run("volume", "import", str(img), "p/mydata")
    v.run("volume", "create", "p/qc", "--size", "1M")
    v.run("snapshot", "create", "p/qc@v1")
    v.fails(2, "volume", "rebase", "p/mydata", "p/qc@v1", match="not a clone")
    out = tmp_path / "out"
    v.run("volume", "export", "p/mydata", str(out))
    assert out.read_bytes() == img.read_bytes(), "a refused rebase must leave the data alone"


def test_rebase_refuses_a_clone_with_snapshots(v: V) -> None:
    v.run("volume", "create", "p/t", "--size", "1M")
    v.run("snapshot", "create", "p/t@v1")
    v.run("snapshot", "create", "p/t@v2")
    v.run("clone", "p/t@v1", "p/c")
    v.run("snapshot", "create", "p/c@mine")
    v.fails(5, "volume", "rebase", "p/c", "p/t@v2", match="p/c@mine")
    assert v.json("volume", "info", "p/c")["origin"] == "p/t@v1"
