"""Images in and out without NBD in between (virtua.storage.filecopy), offline and beside
`virtua serve`: the daemon copies a local image's data runs into the volume itself, and
an export reads a held snapshot's runs of the pool's data file with qemu-img. What comes
out is checked byte for byte through another path (an NBD export, `qemu-img compare`);
what cannot go that way (compressed, too many runs) still goes over NBD,
and correctly; the held snapshot blocks what could free its chunks, and goes away when
the export ends, fails or its client dies."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_support import Serve, V
from virtua.cli.client import LocalClient
from virtua.errors import Busy, InvalidArgument, VirtuaError
from virtua.storage import filecopy

pytestmark = pytest.mark.interop

MIB = 1 << 20


@pytest.fixture(params=["offline", "serve"])
def v(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[V]:
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "2G")
    if request.param == "offline":
        yield cli
        return
    serve = Serve(cli.home, env={"VIRTUA_JOB_LEASE": "3"})
    try:
        yield cli
    finally:
        serve.stop()


def qemu_io(image: str, fmt: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, image], check=True, capture_output=True)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_of(image: Path, fmt: str, tmp: Path) -> bytes:
    out = tmp / f"{image.name}.check.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def qcow2_with_everything(tmp: Path, name: str = "img.qcow2", extra: tuple[str, ...] = ()) -> Path:
    """Data, an explicit zero range over data, holes, and a tail that ends inside a chunk."""
    img = tmp / name
    subprocess.run(["qemu-img", "create", "-f", "qcow2", *extra, str(img), str(24 * MIB + 12345 // 512 * 512)],
                   check=True, capture_output=True)
    qemu_io(str(img), "qcow2", "write -P 0x11 0 3M", "write -P 0x22 5M 1M", "write -z 1M 512k",
            "write -P 0x33 20M 4M", f"write -P 0x44 {24 * MIB} 4096", "write -P 0x55 7340544 1024")
    return img


def test_a_qcow2_goes_in_and_out_without_nbd_byte_for_byte(v: V, tmp_path: Path) -> None:
    img = qcow2_with_everything(tmp_path)
    want = raw_of(img, "qcow2", tmp_path)
    got = v.json("volume", "import", str(img), "p/a")
    assert got["via"] == "file" and got["format"] == "qcow2"
    assert got["size"] == len(want)
    assert got["allocated"] < 16 * MIB  # holes and zeros were not written
    # read back through NBD (nbdcopy to stdout), not the way it went in
    assert sha(v.run("volume", "export", "p/a", "-").stdout) == sha(want)
    # and out again as qcow2 and raw, read from the pool's data file by qemu-img
    q = tmp_path / "out.qcow2"
    out = v.json("volume", "export", "p/a", str(q), "-O", "qcow2")
    assert out["via"] == "file" and out["size"] == len(want)
    assert sha(raw_of(q, "qcow2", tmp_path)) == sha(want)
    subprocess.run(["qemu-img", "check", str(q)], check=True, capture_output=True)
    r = tmp_path / "out.raw"  # raw: nbdcopy of the held snapshot (faster here than qemu-img)
    assert v.json("volume", "export", "p/a", str(r))["via"] == "nbd"
    assert sha(r.read_bytes()) == sha(want)
    assert os.stat(r).st_blocks * 512 < 16 * MIB  # sparse: its holes stayed holes
    r2 = tmp_path / "nosync.raw"  # as qemu-img convert leaves a file: in the page cache
    assert v.json("volume", "export", "p/a", str(r2), "--no-sync")["via"] == "nbd"
    assert sha(r2.read_bytes()) == sha(want)
    # nothing left behind: no held snapshot, jobs done, the pool clean
    assert v.json("snapshot", "list", "p/a") == []
    jobs = [j for j in v.json("job", "list", "--all") if j["op"] == "volume.export"]
    assert len(jobs) == 3 and all(j["state"] == "done" for j in jobs)
    assert v.json("pool", "check", "p")["problems"] == []


def test_raw_and_snapshots_too(v: V, tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.write(os.urandom(3 * MIB))
        f.seek(9 * MIB)
        f.write(os.urandom(MIB + 512))
    want = img.read_bytes()
    assert v.json("volume", "import", str(img), "p/r")["via"] == "file"
    v.run("snapshot", "create", "p/r@s1")
    with open(img, "r+b") as f:  # the volume changes after the snapshot: the export is of s1
        f.write(b"\xee" * MIB)
    v.run("volume", "import", str(img), "p/tmp")  # (just more data in the pool)
    out = tmp_path / "s1.qcow2"
    assert v.json("volume", "export", "p/r@s1", str(out), "-O", "qcow2")["via"] == "file"
    assert sha(raw_of(out, "qcow2", tmp_path)) == sha(want)
    assert [s["name"] for s in v.json("snapshot", "list", "p/r")] == ["p/r@s1"]


def test_a_compressed_qcow2_goes_over_nbd(v: V, tmp_path: Path) -> None:
    plain = qcow2_with_everything(tmp_path, "plain.qcow2")
    img = tmp_path / "c.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(plain), str(img)], check=True)
    want = raw_of(img, "qcow2", tmp_path)
    got = v.json("volume", "import", str(img), "p/x")
    assert got["via"] == "nbd"  # qemu-img 7.2 maps compressed clusters as if raw: never copied as such
    assert sha(v.run("volume", "export", "p/x", "-").stdout) == sha(want)


@pytest.mark.parametrize("kind", ["backing", "data-file", "vmdk-extent"])
def test_an_image_that_names_host_files_is_refused(v: V, tmp_path: Path, kind: str) -> None:
    """An image must not pull other host files into a volume (a template's guests would
    read them): a backing file, a qcow2 external data file, a VMDK extent elsewhere."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET-HOST-DATA\n".ljust(1 << 20, b"\0"))
    img = tmp_path / f"evil-{kind}.img"
    if kind == "backing":
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(img)],
                       check=True, capture_output=True)
    elif kind == "data-file":
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on",
                        str(img), "1M"], check=True, capture_output=True)
    else:
        img.write_text(f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                       f'createType="monolithicFlat"\n\nRW 2048 FLAT "{secret}" 0\n')
    v.fails(2, "volume", "import", str(img), "p/evil", match="refers to other file(s)")
    assert v.json("volume", "list") == []
    ok = tmp_path / "ok.vmdk"  # a self-contained VMDK still imports
    subprocess.run(["qemu-img", "create", "-f", "vmdk", str(ok), "4M"], check=True, capture_output=True)
    qemu_io(str(ok), "vmdk", "write -P 0x7 0 64k")
    assert v.json("volume", "import", str(ok), "p/ok")["format"] == "vmdk"
    assert sha(v.run("volume", "export", "p/ok", "-").stdout) == sha(raw_of(ok, "vmdk", tmp_path))


def test_a_fragmented_volume_is_exported_over_nbd_from_the_held_snapshot(v: V, tmp_path: Path) -> None:
    img = tmp_path / "holes.raw"
    with open(img, "wb") as f:  # 450 data runs with holes between (64 KiB chunks)
        for i in range(450):
            f.seek(i * 128 * 1024)
            f.write(os.urandom(4096))
        f.truncate(450 * 128 * 1024)
    v.run("volume", "import", str(img), "p/f")
    out = tmp_path / "f.qcow2"
    assert v.json("volume", "export", "p/f", str(out), "-O", "qcow2")["via"] == "nbd"
    assert sha(raw_of(out, "qcow2", tmp_path)) == sha(img.read_bytes())
    assert v.json("snapshot", "list", "p/f") == []


# ---------------------------------------------------------------------- the daemon's side


class Unix(http.client.HTTPConnection):
    def __init__(self, home: Path) -> None:
        super().__init__("virtua", timeout=60)
        self.path_ = str(home / "virtua.sock")

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.path_)


def api(home: Path, path: str, body: dict) -> tuple[int, dict]:  # type: ignore[type-arg]
    c = Unix(home)
    try:
        c.request("POST", path, body=json.dumps(body).encode(), headers={"content-type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[V]:
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "2G")
    serve = Serve(cli.home, env={"VIRTUA_JOB_LEASE": "3"})
    try:
        yield cli
    finally:
        serve.stop()


def test_the_daemon_copies_only_the_file_the_client_opened(served: V, tmp_path: Path) -> None:
    mine = tmp_path / "mine.raw"
    mine.write_bytes(os.urandom(MIB))
    other = tmp_path / "other.raw"
    other.write_bytes(b"\x77" * MIB)
    code, begin = api(served.home, "/v1/pools/p/imports", {"name": "i", "size": MIB, "format": "raw"})
    assert code == 200, begin
    st = os.stat(other)  # the client opened `other`, and names `mine`: the daemon refuses it
    code, got = api(served.home, f"/v1/imports/{begin['job']}/file",
                    {"path": str(mine), "device": st.st_dev, "inode": st.st_ino})
    assert code == 200 and got["copied"] is False and "another file" in got["why"], got
    code, got = api(served.home, f"/v1/imports/{begin['job']}/file",
                    {"path": str(tmp_path / "nope"), "device": 1, "inode": 1})
    assert got["copied"] is False and "cannot open" in got["why"], got
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block the daemon until someone writes
    st = os.stat(fifo)
    code, got = api(served.home, f"/v1/imports/{begin['job']}/file",
                    {"path": str(fifo), "device": st.st_dev, "inode": st.st_ino})
    assert got["copied"] is False, got
    st = os.stat(mine)
    code, got = api(served.home, f"/v1/imports/{begin['job']}/file",
                    {"path": str(mine), "device": st.st_dev, "inode": st.st_ino})
    assert got == {"copied": True, "bytes": MIB}, got
    code, _ = api(served.home, f"/v1/imports/{begin['job']}/end", {})
    assert code == 200
    assert served.run("volume", "export", "p/i", "-").stdout == mine.read_bytes()


def test_a_held_export_blocks_what_would_free_its_chunks_and_a_dead_client_releases_it(
    served: V, tmp_path: Path,
) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(os.urandom(2 * MIB))
    served.run("volume", "import", str(img), "p/d")
    code, begin = api(served.home, "/v1/pools/p/volumes/d/exports", {})
    assert code == 200, begin
    held = f"export-{begin['job']}"
    assert [s["name"] for s in served.json("snapshot", "list", "p/d")] == [f"p/d@{held}"]
    # while held: no removal, not even forced, of the volume or of the held snapshot
    served.fails(8, "volume", "rm", "p/d", "--now", "--force", match="being exported")
    served.fails(8, "snapshot", "rm", f"p/d@{held}", "--force", match="being exported")
    # the volume itself stays writable (a guest's disk goes on): the export is of the snapshot
    served.run("volume", "import", str(img), "p/other")
    # the client never renews, never ends: its lease (3 s here) runs out, the daemon releases it
    deadline = time.monotonic() + 30
    while served.json("snapshot", "list", "p/d"):
        assert time.monotonic() < deadline, "the held snapshot stayed"
        time.sleep(0.5)
    job = next(j for j in served.json("job", "list", "--all") if j["id"] == begin["job"])
    assert job["state"] in ("failed", "interrupted", "undone"), job
    # a client that wakes up now learns that its copy may hold freed chunks: the CLI
    # then deletes what it wrote (virtua.cli.data._export_held)
    code, _ = api(served.home, f"/v1/exports/{begin['job']}/end", {})
    assert code != 200
    served.run("volume", "rm", "p/d", "--now")
    assert served.json("pool", "check", "p")["problems"] == []


def test_the_daemon_never_opens_what_the_path_becomes_after_its_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A user who owns the image's directory swaps the name (a symlink) between the
    daemon's look at the path and its open. Whatever the fstat after the open says, the
    open itself must not reach a FIFO or a device (as root: opening /dev/watchdog arms
    it); here a FIFO, whose open would wake the writer waiting on it."""
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "1G")
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(MIB))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(img)
    st = os.stat(img)
    woke = threading.Event()

    def writer() -> None:
        fd = os.open(fifo, os.O_WRONLY)  # until someone opens it for reading
        woke.set()
        os.close(fd)

    waiting = threading.Thread(target=writer, daemon=True)
    waiting.start()
    swapped: list[str] = []

    def then_swap(fn):  # type: ignore[no-untyped-def]
        def call(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = fn(path, *args, **kwargs)
            if not swapped and isinstance(path, str | Path) and os.fspath(path) == str(link):
                swapped.append(fn.__name__)  # the daemon's first look at the name: now it is the FIFO
                (tmp_path / "new").symlink_to(fifo)
                os.replace(tmp_path / "new", link)
            return out
        return call

    client = LocalClient(cli.home)
    try:
        job = client.call("volume.import.begin", ref="p/x", size=MIB)["job"]
        with monkeypatch.context() as m:
            m.setattr(os, "stat", then_swap(os.stat))
            m.setattr(os, "open", then_swap(os.open))
            got = client.call("volume.import.file", id=job, path=str(link), device=st.st_dev, inode=st.st_ino)
        assert swapped, "control: the name was swapped"
        opened = woke.wait(0.5)
        if got.get("copied"):
            client.call("volume.import.end", id=job)
        else:
            with contextlib.suppress(VirtuaError):
                client.call("volume.import.end", id=job, error="refused")
    finally:
        if not woke.is_set():
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        waiting.join(5)
        client.close()
    assert not opened, "the daemon opened the FIFO the name had become"
    assert got == {"copied": True, "bytes": MIB}, got  # the file it looked at, the client's
    assert cli.run("volume", "export", "p/x", "-").stdout == img.read_bytes()


# ---------------------------------------------------------------------- serve killed (SIGKILL)


def data_filled(tmp: Path) -> Path:
    """256 MiB with a MiB of data every 2 MiB: 16 slices of the daemon's copy, half holes."""
    img = tmp / "big.raw"
    block = os.urandom(MIB)
    with open(img, "wb") as f:
        for i in range(128):
            f.seek(2 * i * MIB)
            f.write(block[i:] + block[:i])
        f.truncate(256 * MIB)
    return img


def killed(serve: Serve) -> None:
    assert serve.proc.wait(30) == -9, "control: serve was killed (SIGKILL), not stopped"
    for pipe in (serve.proc.stdout, serve.proc.stderr):
        if pipe is not None:
            pipe.close()


def test_serve_killed_in_the_middle_of_a_file_import_undoes_it_at_its_next_start(tmp_path: Path) -> None:
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "2G")
    img = data_filled(tmp_path)
    # SIGKILL at the copy's first progress past zero: a slice copied, the next ones planned or in flight
    serve = Serve(cli.home, env={"VIRTUA_JOB_CRASH": "volume.import:1:progress"})
    r = cli.run("volume", "import", str(img), "p/half", ok=False)
    killed(serve)
    assert r.returncode != 0 and b"not answering" in r.stderr, r.stderr
    # control, without a CLI (it would recover the job): the copy was under way, far from done
    # (its first slice planned, its copy in flight or just written)
    db = sqlite3.connect(f"file:{cli.home / 'jobs.db'}?mode=ro", uri=True)
    try:
        (row,) = db.execute("SELECT record FROM jobs WHERE state = 'running'").fetchall()
    finally:
        db.close()
    assert [s["state"] for s in json.loads(row[0])["steps"]] == ["done", "running"]
    assert os.stat(cli.home / "pools" / "p" / "data").st_blocks * 512 <= 2 * MIB
    serve = Serve(cli.home)  # its start undoes the killed serve's job, before any client sees the pool
    try:
        assert cli.json("volume", "list") == [], "no half-imported volume"
        job = next(j for j in cli.json("job", "list", "--all") if j["op"] == "volume.import")
        assert job["state"] == "undone" and "interrupted" in job["error"], job
        assert [s["state"] for s in job["steps"]] == ["undone", "undone"], job
        check = cli.json("pool", "check", "p")
        assert check["problems"] == [] and cli.json("pool", "info", "p")["used"] == 0, check
        got = cli.json("volume", "import", str(img), "p/half")  # the name is free; a whole copy is whole
        assert got["via"] == "file" and got["allocated"] == 128 * MIB
        assert sha(cli.run("volume", "export", "p/half", "-").stdout) == sha(img.read_bytes())
    finally:
        serve.stop()


def test_serve_killed_while_an_export_is_held_releases_it_at_its_next_start(tmp_path: Path) -> None:
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "2G")
    serve = Serve(cli.home)
    img = data_filled(tmp_path)
    assert cli.json("volume", "import", str(img), "p/d")["via"] == "file"
    code, begin = api(cli.home, "/v1/pools/p/volumes/d/exports", {})  # a reader holds it: the copy is under way
    assert code == 200, begin
    held = cli.json("job", "list")
    assert [(j["id"], j["op"], j["state"]) for j in held] == [(begin["job"], "volume.export", "running")], held
    assert [s["name"] for s in cli.json("snapshot", "list", "p/d")] == [f"p/d@export-{begin['job']}"]
    serve.proc.kill()
    killed(serve)
    serve = Serve(cli.home)
    try:
        assert cli.json("snapshot", "list", "p/d") == [], "the held snapshot is gone"
        job = next(j for j in cli.json("job", "list", "--all") if j["id"] == begin["job"])
        assert job["state"] == "undone" and "interrupted" in job["error"], job
        code, _ = api(cli.home, f"/v1/exports/{begin['job']}/end", {})
        assert code != 200, "a late end of the killed serve's export is refused (the CLI drops its copy)"
        assert cli.json("pool", "check", "p")["problems"] == []
        out = tmp_path / "d.qcow2"  # nothing holds the volume any more: it exports, and goes
        assert cli.json("volume", "export", "p/d", str(out), "-O", "qcow2")["via"] == "file"
        assert sha(raw_of(out, "qcow2", tmp_path)) == sha(img.read_bytes())
        cli.run("volume", "rm", "p/d", "--now")
        assert cli.json("pool", "check", "p")["problems"] == [] and cli.json("pool", "info", "p")["used"] == 0
    finally:
        serve.stop()


def test_an_image_cut_while_it_is_copied_fails_its_import_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The image's owner truncates it after the daemon mapped it: the copy finds it short.
    That is the image's fault, said as such (not an internal error, HTTP 500 through
    serve), and the job removes its volume."""
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "1G")
    img = tmp_path / "cut.raw"
    img.write_bytes(os.urandom(8 * MIB))
    mapped = filecopy.image_runs

    def then_cut(fd: int, fmt: str, size: int) -> object:
        runs = mapped(fd, fmt, size)
        os.truncate(img, MIB)
        return runs

    monkeypatch.setattr(filecopy, "image_runs", then_cut)
    st = os.stat(img)
    client = LocalClient(cli.home)
    try:
        job = client.call("volume.import.begin", ref="p/cut", size=8 * MIB)["job"]
        with pytest.raises(InvalidArgument, match="ends at byte 1048576"):
            client.call("volume.import.file", id=job, path=str(img), device=st.st_dev, inode=st.st_ino)
        with pytest.raises(InvalidArgument):
            client.call("volume.import.end", id=job, error="cut")
    finally:
        client.close()
    assert cli.json("volume", "list") == []
    assert cli.json("pool", "check", "p")["problems"] == []


def test_an_import_cannot_end_or_lose_its_volume_while_the_daemon_looks_at_its_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the daemon probes the image (qemu-img check of a big qcow2 takes a while),
    another call ends the import as a success, or removes the volume: the first left a
    volume of partial data that looks whole (the copy went on into a finished job's
    volume; a crash kept it half full), the second failed the copy half way. Both are
    Busy now, until the copy ends."""
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "1G")
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(2 * MIB))
    st = os.stat(img)
    client = LocalClient(cli.home)
    meanwhile: list[str] = []
    probe = filecopy.image_runs

    def and_meanwhile(fd: int, fmt: str, size: int) -> object:
        for op, args in (("volume.import.end", {"id": job}), ("volume.rm", {"ref": "p/i", "now": True})):
            try:
                client.call(op, **args)
                meanwhile.append(f"{op} done")
            except Busy:
                meanwhile.append(f"{op} busy")
        return probe(fd, fmt, size)

    monkeypatch.setattr(filecopy, "image_runs", and_meanwhile)
    try:
        job = client.call("volume.import.begin", ref="p/i", size=2 * MIB)["job"]
        got = client.call("volume.import.file", id=job, path=str(img), device=st.st_dev, inode=st.st_ino)
        assert meanwhile == ["volume.import.end busy", "volume.rm busy"], meanwhile
        assert got == {"copied": True, "bytes": 2 * MIB}
        assert client.call("volume.import.end", id=job)["name"] == "p/i"
    finally:
        client.close()
    assert cli.run("volume", "export", "p/i", "-").stdout == img.read_bytes()


def test_an_image_rewritten_after_its_probe_pulls_in_no_host_file(tmp_path: Path) -> None:
    """The image's owner adds a backing file to its header (qemu-img rebase -u) once the
    probe has found it self-contained; a compressed qcow2 goes over NBD, where the CLI's
    qemu-img convert (root) read the header again and followed the backing file. It now
    opens the image with its backing forbidden (json: {"backing": null})."""
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "1G")
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(MIB // 2) + b"HOST-SECRET\n" * 64)
    secret.chmod(0o600)
    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(plain), "1M"], check=True, capture_output=True)
    qemu_io(str(plain), "qcow2", "write -P 7 0 64k")
    img = tmp_path / "c.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(plain), str(img)], check=True)
    race = tmp_path / "bin"
    race.mkdir()
    (race / "qemu-img").write_text(  # stands in for the owner's timing: the header changes before convert opens it
        f'#!/bin/sh\n[ "$1" = convert ] && /usr/bin/qemu-img rebase -u -b {secret} -F raw {img}\n'
        'exec /usr/bin/qemu-img "$@"\n')
    (race / "qemu-img").chmod(0o755)
    cli.env["PATH"] = f"{race}:{cli.env['PATH']}"
    cli.run("volume", "import", str(img), "p/x", ok=False)
    volumes = [v["name"] for v in cli.json("volume", "list")]
    assert "p/x" not in volumes or b"HOST-SECRET" not in cli.run("volume", "export", "p/x", "-").stdout
    # and an image that is not tampered with still comes in whole that way
    cli.env["PATH"] = cli.env["PATH"].split(":", 1)[1]
    fresh = tmp_path / "c2.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(plain), str(fresh)], check=True)
    cli.run("volume", "import", str(fresh), "p/y")
    got = cli.run("volume", "export", "p/y", "-").stdout
    assert got[:65536] == bytes([7]) * 65536 and got[65536:].count(0) == len(got) - 65536
