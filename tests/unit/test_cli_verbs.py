"""The verbs people reach for, each with a round trip: rename, copy, protect, du,
export-diff/import-diff (rebuilds the volume byte for byte), trash, and the thin-capacity warning."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.cli_support import V


@pytest.fixture
def v(tmp_path: Path) -> V:
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "256M", "--chunk-size", "64K", "--overcommit", "8")
    return cli


def write(v: V, tmp_path: Path, ref: str, pieces: dict[int, bytes], size: int = 8 << 20) -> bytes:
    """Import a raw image of size with pieces at their offsets into ref (fresh) and return it."""
    img = bytearray(size)
    for off, data in pieces.items():
        img[off : off + len(data)] = data
    path = tmp_path / "img"
    path.write_bytes(bytes(img))
    v.run("volume", "import", str(path), ref)
    return bytes(img)


def export(v: V, ref: str) -> bytes:
    return v.run("volume", "export", ref, "-").stdout


def test_rename_copy_and_snapshot_rename(v: V, tmp_path: Path) -> None:
    img = write(v, tmp_path, "p/a", {0: os.urandom(1 << 20), 5 << 20: b"x" * 4096})
    v.run("snapshot", "create", "p/a@s1")
    assert v.json("volume", "rename", "p/a", "b")["name"] == "p/b"
    v.fails(3, "volume", "info", "p/a", match="does not exist")
    assert export(v, "p/b@s1") == img, "snapshots go with the renamed volume"
    v.run("snapshot", "rename", "p/b@s1", "v1")
    assert [s["name"] for s in v.json("snapshot", "list", "p/b")] == ["p/b@v1"]
    copy = v.json("volume", "copy", "p/b@v1", "p/c")
    assert copy["origin"] is None and copy["shared"] == 0, "a deep copy shares nothing"
    assert copy["allocated"] == (1 << 20) + (64 << 10), "holes stay holes"
    assert export(v, "p/c") == img
    v.run("volume", "rm", "p/b", "--recursive", "--now")
    assert export(v, "p/c") == img, "the copy is independent of its source"
    v.fails(4, "volume", "rename", "p/c", "c", match="already exists")


def test_protected_snapshot_cannot_be_removed(v: V) -> None:
    v.run("volume", "create", "p/t", "--size", "1M")
    v.run("snapshot", "create", "p/t@gold")
    assert v.json("snapshot", "protect", "p/t@gold")["protected"] is True
    v.fails(5, "snapshot", "rm", "p/t@gold", match="protected")
    v.fails(5, "volume", "rm", "p/t", "--recursive", "--now", match="protected")
    v.run("snapshot", "unprotect", "p/t@gold")
    v.run("snapshot", "rm", "p/t@gold")


def test_du_per_snapshot(v: V, tmp_path: Path) -> None:
    write(v, tmp_path, "p/d", {0: os.urandom(1 << 20)})
    v.run("snapshot", "create", "p/d@s1")
    v.run("clone", "p/d@s1", "p/scratch")  # not p/d's: must not count
    rows = v.json("volume", "du", "p/d")
    assert rows == [
        {"name": "p/d@s1", "provisioned": 8 << 20, "used": 1 << 20},
        {"name": "p/d", "provisioned": 8 << 20, "used": 0},
    ], rows


def test_export_diff_import_diff_rebuild_the_volume(v: V, tmp_path: Path) -> None:
    from virtua.storage.service import Storage

    first = write(v, tmp_path, "p/src", {0: os.urandom(1 << 20), 6 << 20: os.urandom(200 << 10)})
    v.run("snapshot", "create", "p/src@s1")
    st = Storage(v.home)  # change some data and zero some, in-process (no daemon runs)
    dev = st.open_device("p/src")
    dev.write(3 << 20, os.urandom(128 << 10))
    dev.write_zeroes(6 << 20, 200 << 10)
    dev.flush()
    st.close()
    v.run("snapshot", "create", "p/src@s2")
    full, inc = tmp_path / "full.diff", tmp_path / "inc.diff"
    assert v.json("volume", "export-diff", "p/src@s1", str(full))["data"] == (1 << 20) + (256 << 10)
    # 3 whole chunks zeroed; the 4th, partly zeroed, travels as data with the 2 changed ones
    assert v.json("volume", "export-diff", "p/src@s2", str(inc), "--from", "s1")["zeroed"] == 192 << 10
    assert inc.stat().st_size < (192 << 10) + 4096, "an incremental diff carries only what changed"
    v.fails(3, "volume", "import-diff", str(inc), "p/dst", match="full diff")
    assert v.json("volume", "import-diff", str(full), "p/dst")["snapshot_taken"] == "s1"
    v.json("volume", "import-diff", str(inc), "p/dst")
    assert export(v, "p/dst@s1") == first
    assert export(v, "p/dst") == export(v, "p/src@s2"), "the diffs rebuild the volume byte for byte"
    assert [s["name"] for s in v.json("snapshot", "list", "p/dst")] == ["p/dst@s1", "p/dst@s2"]
    v.fails(4, "volume", "import-diff", str(inc), "p/src", match="applied already")  # checked before writing
    v.fails(4, "volume", "export-diff", "p/src@s1", str(full), match="--force")
    truncated = tmp_path / "cut.diff"
    truncated.write_bytes(full.read_bytes()[:5000])
    v.fails(2, "volume", "import-diff", str(truncated), "p/other", match="truncated")
    assert "p/other" not in {x["name"] for x in v.json("volume", "list")}, \
        "a full diff that did not apply leaves no half-restored volume behind"
    # an incremental one cut short has changed the volume already: say how to undo it
    v.run("volume", "import-diff", str(full), "p/third")
    (tmp_path / "cut-inc.diff").write_bytes(inc.read_bytes()[:-100])
    r = v.run("volume", "import-diff", str(tmp_path / "cut-inc.diff"), "p/third", ok=False)
    err = r.stderr.decode()
    assert r.returncode == 2 and "truncated" in err, err
    assert "snapshot rollback p/third@s1" in err and "Traceback" not in err, err
    assert "p/third" in {x["name"] for x in v.json("volume", "list")}


def test_trash_keeps_a_removed_volume_until_restored_or_expired(v: V, tmp_path: Path) -> None:
    img = write(v, tmp_path, "p/keep", {0: os.urandom(256 << 10)})
    out = v.json("volume", "rm", "p/keep")
    assert out["trashed"] == ["p/keep"] and out["expires"] > time.time() + 6 * 86400
    assert v.json("volume", "list") == [], "a trashed volume is out of sight"
    assert [e["name"] for e in v.json("trash", "list")] == ["p/keep"]
    assert v.json("pool", "info", "p")["used"] == 256 << 10, "the trash still holds the data"
    v.run("trash", "restore", "p/keep")
    assert export(v, "p/keep")[: 256 << 10] == img[: 256 << 10]
    # a user who removes a volume to get space back is told that the trash keeps it
    err = v.run("volume", "rm", "p/keep").stderr.decode()
    assert "warning:" in err and "256 KiB stay allocated" in err and "trash purge p --all" in err, err
    v.run("trash", "restore", "p/keep")
    v.run("volume", "rm", "p/keep", "--keep", "1s")
    time.sleep(1.5)
    assert v.json("trash", "list") == [], "its time is up: purged"
    assert v.json("pool", "info", "p")["used"] == 0
    v.fails(3, "trash", "restore", "p/keep", match="no volume p/keep in the trash")
    assert v.json("pool", "check", "p")["ok"]


def test_capacity_beyond_the_filesystem_is_accepted_with_a_warning(v: V) -> None:
    r = v.run("pool", "create", "huge", "--capacity", "1P")
    err = r.stderr.decode()
    assert "warning:" in err and "capacity 1 PiB is more than its filesystem holds" in err, err
    info = v.json("pool", "info", "huge")
    assert info["capacity"] == 1 << 50 and info["filesystem_size"] < 1 << 50
    assert "GiB" in info["warning"], info["warning"]
