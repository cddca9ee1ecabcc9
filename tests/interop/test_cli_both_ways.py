"""One behaviour with or without the daemon: every storage command runs in a home the CLI
holds itself, in a home a real `virtua serve` holds, and against a third serve reached as
from another machine (--api with the admin certificate, from an empty home: the data goes
over NBD on TCP with TLS); output, JSON, errors and exit codes must be the same
(timestamps and the home's path aside; and, from afar, which way the data went)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.cli_support import RemoteV, Serve, V

pytestmark = pytest.mark.interop

ONCE = "once:"  # a row that changes state: run once (human output), not again with --json
# {img}, {qcow}, {big}, {out}, {full} are filled in per home
TABLE: list[tuple[str, ...]] = [
    ("pool", "create", "p", "--capacity", "64M", "--chunk-size", "64K"),
    ("pool", "create", "tiny", "--capacity", "1M", "--chunk-size", "64K"),
    ("pool", "list"),
    ("pool", "info", "p"),
    ("volume", "create", "p/a", "--size", "8M"),
    ("volume", "create", "p/a", "--size", "8M"),
    ("volume", "create", "p/big", "--size", "2P"),
    ("volume", "import", "{img}", "p/b"),
    ("volume", "import", "{qcow}", "p/q"),
    ("volume", "import", "-", "p/s"),
    ("volume", "import", "{big}", "tiny/big"),
    ("volume", "list"),
    ("volume", "info", "p/b"),
    ("volume", "info", "p/none"),
    ("volume", "status", "p/b"),
    ("snapshot", "create", "p/b@s1"),
    ("snapshot", "list", "p/b"),
    ("clone", "p/b@s1", "p/c", "--count", "2"),
    ("snapshot", "create", "p/b@s2"),
    ("volume", "rebase", "p/c-2", "p/b@s2"),
    ("volume", "rebase", "p/a", "p/b@s2"),
    ("volume", "reset", "p/c-1"),
    ("volume", "flatten", "p/c-1"),
    ("volume", "resize", "p/a", "--size", "16M"),
    ("volume", "resize", "p/a", "--size", "4M"),
    ("volume", "export", "p/b", "{out}/b.raw"),
    ("volume", "export", "p/b", "{out}/b.raw"),
    ("volume", "export", "p/b@s1", "{out}/s1.qcow2", "-O", "qcow2"),
    ("volume", "export", "p/q", "-"),
    ("volume", "export", "p/b", "{full}/b.raw"),
    ("snapshot", "rollback", "p/b@s1"),
    (ONCE, "volume", "rename", "p/a", "p/a2"),
    (ONCE, "volume", "copy", "p/b@s1", "p/copy"),
    ("volume", "du", "p/b"),
    (ONCE, "volume", "export-diff", "p/b@s2", "{out}/d.diff", "--from", "s1"),
    (ONCE, "volume", "rm", "p/c-1"),
    ("trash", "list", "p"),
    (ONCE, "trash", "restore", "p/c-1"),
    (ONCE, "snapshot", "protect", "p/b@s2"),
    ("snapshot", "rm", "p/b@s2"),
    (ONCE, "snapshot", "unprotect", "p/b@s2"),
    ("snapshot", "rm", "p/b@s1"),
    (ONCE, "volume", "rm", "p/c-1", "--now"),
    (ONCE, "volume", "rm", "p/b", "--recursive", "--now"),
    ("pool", "check", "p"),
]
# seconds optional: the trash warning names its expiry to the minute, and the two runs can straddle one
STAMP = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)?|\"(created|since|deleted|expires)\": [0-9.e+]+")


JOB_ID = re.compile(rb"\d{8}-\d{6}-[0-9a-f]{6}")  # virtua.jobs.record.new_job_id


# the data file's allocated bytes (pool check's file_bytes) are the filesystem's count:
# one block more or less from run to run is the filesystem, not virtua; compared in chunks
FILE_BYTES = re.compile(rb'("file_bytes": |file bytes +)(\d+)')


def normal(out: bytes, home: Path) -> bytes:
    out = JOB_ID.sub(b"<job>", out)
    out = FILE_BYTES.sub(lambda m: m.group(1) + str(int(m.group(2)) >> 16 << 16).encode(), out)
    return STAMP.sub(b"<time>", out.replace(str(home.parent).encode(), b"<tmp>").replace(home.name.encode(), b"<home>"))


# which way the data went (`via`: the pool's own file copy, or NBD) and so the size of a
# qcow2 that qemu-img wrote from one source or the other: a remote CLI has only NBD
VIA = re.compile(rb'("via": "|via +)(file|nbd)|("file_size": |file size +)[0-9.]+[KMG]?')


def test_every_storage_command_behaves_the_same_with_and_without_serve(tmp_path: Path) -> None:
    img = tmp_path / "img.raw"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(1 << 20))
    qcow = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(img), str(qcow)], check=True)
    big = tmp_path / "big.raw"
    big.write_bytes(os.urandom(2 << 20))
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(full)], check=True)
    offline, online = V(tmp_path / "offline"), V(tmp_path / "online_")  # same length: same column widths
    serve = Serve(online.home)
    far = Serve(tmp_path / "remote_")
    remote = RemoteV(far, tmp_path / "client")
    seen: list[tuple[tuple[str, ...], tuple[object, ...]]] = []
    try:
        for v in (offline, online, remote):
            (v.home.parent / f"{v.home.name}-out").mkdir()
        for row in TABLE:
            once = row[0] == ONCE
            args = row[1:] if once else row
            results = []
            for v in (offline, online, remote):
                fill = {"{img}": str(img), "{qcow}": str(qcow), "{big}": str(big), "{full}": str(full),
                        "{out}": str(v.home.parent / f"{v.home.name}-out")}
                argv = [fill.get(a, a.replace("{out}", fill["{out}"]).replace("{full}", str(full))) for a in args]
                stdin = img.read_bytes() if "-" in args and "import" in args else None
                human = v.run(*argv, ok=False, input=stdin)
                if once or (human.returncode == 0 and args[0:2] in (("pool", "create"), ("volume", "create"))):
                    results.append((human.returncode, normal(human.stdout, v.home), normal(human.stderr, v.home)))
                    continue  # creating twice would be an error: the human run is the only run
                if args[:2] == ("volume", "export") and human.returncode == 0 and argv[-1] != "-":
                    os.unlink(argv[3])
                as_json = v.run(*argv, "--json", ok=False, input=stdin)
                results.append((human.returncode, normal(human.stdout, v.home), normal(human.stderr, v.home),
                                as_json.returncode, normal(as_json.stdout, v.home), normal(as_json.stderr, v.home)))
            assert results[0] == results[1], f"{' '.join(args)}: offline {results[0]!r}\n  serve {results[1]!r}"
            near, afar = (tuple(VIA.sub(b"<via>", x) if isinstance(x, bytes) else x for x in r) for r in results[1:])
            assert near == afar, f"{' '.join(args)}: serve {results[1]!r}\n  --api {results[2]!r}"
            seen.append((args, results[0]))
            if args[:2] == ("volume", "export") and args[-1] == "-":
                assert results[0][1] == img.read_bytes()
    finally:
        serve.stop()
        far.stop()
        subprocess.run(["umount", str(full)], check=True)
    # the table must exercise the errors it claims to compare
    codes = {" ".join(args): r[0] for args, r in seen}
    assert codes["snapshot rm p/b@s2"] == 5, "a protected snapshot is not removed"
    assert all(r[0] == 0 for a, r in seen if a[:2] in (("volume", "rename"), ("volume", "copy"), ("trash", "restore")))
    assert codes["volume create p/big --size 2P"] == codes["volume import {big} tiny/big"] == 6
    assert codes["volume export p/b {full}/b.raw"] == 6 and codes["volume info p/none"] == 3
    assert codes["volume rebase p/a p/b@s2"] == 2 and codes["volume resize p/a --size 4M"] == 2
    assert [r[0] for _, r in seen].count(4) == 2, "creating p/a twice, exporting over b.raw"
    assert b"pool tiny is full" in dict((" ".join(a), r) for a, r in seen)["volume import {big} tiny/big"][2]
    assert (tmp_path / "offline-out" / "b.raw").read_bytes() == img.read_bytes()
