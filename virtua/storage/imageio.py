"""Raw (and, through qemu-img, qcow2) images in and out of volumes, sparse-aware.

Zero runs stay unallocated on import (SEEK_DATA/SEEK_HOLE skip the source's holes, and
all-zero chunks are not written) and become holes on export.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from virtua.errors import InvalidArgument, NotFound, Unavailable
from virtua.storage.device import BlockDevice

Progress = Callable[[int], None]  # bytes done so far
COPY_BLOCK = 4 << 20
# qemu-img info and check of one image to import: a crafted one must not hold the import
# (and its job) forever; a real one of terabytes takes seconds (they read tables only)
PROBE_TIMEOUT = 120.0


@contextmanager
def raw_source(path: str) -> Iterator[str]:
    """A raw file to read: the path itself, a conversion of a qcow2, or a copy of stdin."""
    if path != "-" and not os.path.exists(path):
        raise NotFound(f"no such file: {path}")
    with tempfile.TemporaryDirectory(prefix="virtua-import-") as tmp:
        if path == "-":
            dst = os.path.join(tmp, "stdin.raw")
            with open(dst, "wb") as f:
                _copy_sparse_stream(sys.stdin.buffer, f)
            yield dst
            return
        fmt = probe(path).format  # damaged, truncated or naming other host files: refused
        if fmt == "raw":
            yield path
            return
        dst = os.path.join(tmp, "image.raw")
        r = subprocess.run(
            ["qemu-img", "convert", *_source_args(path, fmt), "-O", "raw", dst], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise InvalidArgument(f"cannot read {path} ({fmt}): {r.stderr.strip()}")
        yield dst


def _copy_sparse_stream(src: object, dst: object) -> None:
    read = src.read  # type: ignore[attr-defined]
    total = 0
    while True:
        block = read(COPY_BLOCK)
        if not block:
            break
        if block.count(0) == len(block):
            dst.seek(len(block), os.SEEK_CUR)  # type: ignore[attr-defined]
        else:
            dst.write(block)  # type: ignore[attr-defined]
        total += len(block)
    dst.truncate(total)  # type: ignore[attr-defined]


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data regions of a file, by SEEK_DATA/SEEK_HOLE."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        try:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            end = size
        yield start, min(end, size) - start
        pos = end


def import_into(raw_path: str, dev: BlockDevice, progress: Progress | None = None) -> int:
    """Copy a raw file into dev; returns the bytes actually written (zeros are skipped)."""
    written = 0
    for done in import_steps(raw_path, dev, progress):
        written = done
    dev.flush()
    return written


def import_steps(raw_path: str, dev: BlockDevice, progress: Progress | None = None) -> Iterator[int]:
    """import_into without the flush, a COPY_BLOCK at a time: yields the bytes written so
    far after each (where `virtua serve` lets its other clients in)."""
    written = 0
    chunk = max(dev.block_size, 1)
    step = max(COPY_BLOCK - COPY_BLOCK % chunk, chunk)
    with open(raw_path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        for start, length in data_ranges(fd, size):
            # align to the device's chunks so all-zero chunks can be skipped whole
            pos = start - start % chunk
            end = start + length
            while pos < end:
                n = min(step, end - pos, dev.size - pos)
                if n <= 0:
                    break
                block = os.pread(fd, n, pos)
                view = memoryview(block)
                for off in range(0, len(block), chunk):
                    piece = view[off : off + chunk]
                    if piece.nbytes and bytes(piece).count(0) != piece.nbytes:
                        dev.write(pos + off, piece)
                        written += piece.nbytes
                pos += n
                if progress:
                    progress(pos)
                yield written


def export_from(dev: BlockDevice, dest: str, fmt: str = "raw", progress: Progress | None = None) -> None:
    """Write dev to a raw file (holes stay holes), stdout ('-'), or qcow2 via qemu-img."""
    if fmt not in ("raw", "qcow2"):
        raise InvalidArgument(f"unknown format {fmt!r}: use raw or qcow2")
    if fmt == "qcow2":
        if dest == "-":
            raise InvalidArgument("qcow2 cannot be written to stdout")
        if shutil.which("qemu-img") is None:
            raise Unavailable("qemu-img is not installed (apt-get install qemu-utils)")
        with tempfile.TemporaryDirectory(prefix="virtua-export-", dir=os.path.dirname(os.path.abspath(dest))) as tmp:
            raw = os.path.join(tmp, "image.raw")
            export_from(dev, raw, "raw", progress)
            r = subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, dest], capture_output=True, text=True
            )
            if r.returncode != 0:
                raise InvalidArgument(f"qemu-img convert failed: {r.stderr.strip()}")
        return
    size = dev.size
    if dest == "-":
        out = sys.stdout.buffer
        for ext in dev.block_status(0, size):
            pos = ext.offset
            while pos < ext.offset + ext.length:
                n = min(COPY_BLOCK, ext.offset + ext.length - pos)
                out.write(bytes(n) if ext.flags & 2 else dev.read(pos, n))
                pos += n
                if progress:
                    progress(pos)
        out.flush()
        return
    path = Path(dest)
    with open(path, "wb") as f:
        fd = f.fileno()
        os.ftruncate(fd, size)
        for ext in dev.block_status(0, size):
            if ext.flags & 2:  # reads as zeros: leave a hole
                if progress:
                    progress(ext.offset + ext.length)
                continue
            pos = ext.offset
            while pos < ext.offset + ext.length:
                n = min(COPY_BLOCK, ext.offset + ext.length - pos)
                os.pwrite(fd, dev.read(pos, n), pos)
                pos += n
                if progress:
                    progress(pos)
        os.fsync(fd)


# ---------------------------------------------------------------------- streamed copies
#
# Import and export move data between a file (or stdin/stdout) and a volume's NBD export
# with qemu-img convert (qcow2 and other formats) or nbdcopy (raw): no temporary raw copy,
# holes skipped both ways, and the same code whether `virtua serve` or the CLI holds the pool.

QCOW2_MAGIC = b"QFI\xfb"
_NO_CHECK = 63  # qemu-img check: "this image format does not support checks"


@dataclass
class Image:
    path: str
    format: str  # "raw", "qcow2", ... (what qemu-img calls it)
    virtual_size: int
    file_size: int


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise Unavailable(f"{tool} is not installed (apt-get install {package})")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def probe(path: str) -> Image:
    """What a file to import is, refused with the reason if it is damaged or truncated."""
    if not os.path.exists(path):
        raise NotFound(f"no such file: {path}")
    if not os.path.isfile(path):
        raise InvalidArgument(f"{path} is not a regular file")
    file_size = os.path.getsize(path)
    if file_size == 0:
        raise InvalidArgument(f"{path} is empty")
    with open(path, "rb") as f:
        magic = f.read(4)
    _need("qemu-img", "qemu-utils")
    fmt = "qcow2" if magic == QCOW2_MAGIC else None
    args = ["qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), path]
    r = _inspect(args, path)
    if r.returncode != 0:
        what = f"damaged {fmt} image" if fmt else "unreadable image"
        raise InvalidArgument(f"{path}: {what}: {_first_line(r.stderr).removeprefix('qemu-img: ')}")
    info = json.loads(r.stdout)
    fmt = str(info.get("format", "raw"))
    others = _other_files(info, path)
    if others:
        # qemu-img would read them into the volume: an image must not pull host files in
        # (a backing file, a qcow2 data file, a VMDK extent naming /etc/shadow)
        raise InvalidArgument(f"{path}: the {fmt} image refers to other file(s) ({', '.join(others[:3])}): "
                              "only self-contained images are imported; make one with "
                              f"`qemu-img convert -O qcow2 {path} NEW.qcow2` if you trust what it names")
    if fmt == "raw":
        return Image(path, "raw", file_size, file_size)
    r = _inspect(["qemu-img", "check", "--output=json", "-f", fmt, path], path)
    if r.returncode not in (0, 3, _NO_CHECK):  # 3: leaked clusters only, harmless for reading
        try:
            report = json.loads(r.stdout)
        except ValueError:
            report = {}
        corrupt = int(report.get("corruptions", 0))
        end = int(report.get("image-end-offset", 0))
        why = f"{corrupt} corruption(s)" if corrupt else _first_line(r.stderr)
        if end > file_size or any("end of the file" in line for line in r.stderr.splitlines()[:5]):
            why += f"; the file is truncated (it ends at {file_size} bytes, its tables reach past it)"
        raise InvalidArgument(f"{path}: damaged {fmt} image: qemu-img check found {why}")
    return Image(path, fmt, int(info["virtual-size"]), file_size)


def _inspect(args: list[str], path: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise InvalidArgument(f"{path}: `{' '.join(args[:2])}` did not finish within {PROBE_TIMEOUT:g} s: "
                              "refused (a damaged or crafted image)") from None


_FILE_KEYS = ("filename", "backing-filename", "full-backing-filename", "data-file", "backing_file")


def _other_files(info: Any, path: str) -> list[str]:
    """Every file name in qemu-img info's answer that is not the image itself."""
    me = os.path.realpath(path)
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in _FILE_KEYS and isinstance(v, str):
                    if k != "filename" or os.path.realpath(v) != me:
                        found.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(info)
    return list(dict.fromkeys(found))


def nbd_uri(socket_path: str, export: str) -> str:
    # percent-encoded: libnbd and qemu-img decode it; a home with a space failed to parse
    return f"nbd+unix:///{export}?socket={quote(socket_path, safe='/')}"


# the DNS name only the manager's certificate carries (virtua.pki): qemu-img checks it
MANAGER_TLS_NAME = "virtua-manager"
_TLS_OBJECT = "virtua-tls"


@dataclass(frozen=True)
class NbdPlace:
    """Where the exports are, as each copy tool names them: serve's (or this process's)
    unix socket, in plaintext; or serve's TCP port, with TLS and the client certificate
    directory `certs` (QEMU's layout: ca-cert.pem, client-cert.pem, client-key.pem)."""

    socket: str | None = None
    host: str = ""
    port: int = 0
    certs: str | None = None

    def nbdcopy_args(self, export: str, write: bool) -> list[str]:
        """For nbdcopy, after `--`: the socket's URI; over TCP, qemu-nbd as its end
        (socket activation), a TLS client that checks the peer is the manager, as qemu-img
        does. libnbd 1.14 checks the CA and the address only, which a host's certificate
        passes where it carries that address (every local agent's says 127.0.0.1)."""
        if self.socket is not None:
            return [nbd_uri(self.socket, export)]
        _need("qemu-nbd", "qemu-utils")
        return ["[", "qemu-nbd", *([] if write else ["--read-only"]), *self.qemu_objects(), "-f", "raw",
                self.qemu_name(export), "]"]

    def qemu_objects(self) -> list[str]:
        if self.socket is not None:
            return []
        # QEMU's option syntax: a comma ends the value, a doubled one is a comma of the path
        certs = (self.certs or "").replace(",", ",,")
        return ["--object", f"tls-creds-x509,id={_TLS_OBJECT},dir={certs},endpoint=client"]

    def qemu_name(self, export: str) -> str:
        """For qemu-img, beside qemu_objects(): over TCP it checks the peer is the manager."""
        if self.socket is not None:
            return nbd_uri(self.socket, export)
        nbd = {"driver": "nbd", "server": {"type": "inet", "host": self.host, "port": str(self.port)},
               "export": export, "tls-creds": _TLS_OBJECT, "tls-hostname": MANAGER_TLS_NAME}
        return "json:" + json.dumps({"file": nbd}, separators=(",", ":"))


PROGRESS_FD = "{progress_fd}"  # run_copy puts the progress pipe's descriptor here


def import_command(image: Image, place: NbdPlace, export: str) -> list[str]:
    """Copy image into an empty volume (its zeros are skipped, never written)."""
    if image.format == "raw":
        _need("nbdcopy", "libnbd-bin")
        return ["nbdcopy", "--destination-is-zero", "--flush", f"--progress={PROGRESS_FD}", "--", image.path,
                *place.nbdcopy_args(export, write=True)]
    return ["qemu-img", "convert", "-p", "-n", "--target-is-zero", "-W", *place.qemu_objects(),
            *_source_args(image.path, image.format), "-O", "raw", place.qemu_name(export)]


# formats whose header may name a backing file: opened with it forbidden, whatever the
# header says by the time qemu-img reads it (its owner may rewrite it after the probe)
_BACKED_FORMATS = ("qcow2", "qed", "vmdk", "qcow")


def _source_args(path: str, fmt: str) -> list[str]:
    if fmt not in _BACKED_FORMATS:
        return ["-f", fmt, path]
    spec = {"driver": fmt, "backing": None, "file": {"driver": "file", "filename": path}}
    return ["json:" + json.dumps(spec, separators=(",", ":"))]


def stream_import_command(place: NbdPlace, export: str) -> list[str]:
    """stdin (raw) into an empty volume: nbdcopy reads a pipe in order, skipping zeros."""
    _need("nbdcopy", "libnbd-bin")
    return ["nbdcopy", "--destination-is-zero", "--flush", "--", "-", *place.nbdcopy_args(export, write=True)]


def export_command(place: NbdPlace, export: str, dest: str, fmt: str) -> list[str]:
    """Copy a volume to dest ('-' for stdout: raw only); holes stay holes."""
    if fmt == "raw":
        _need("nbdcopy", "libnbd-bin")
        return ["nbdcopy", f"--progress={PROGRESS_FD}", "--", *place.nbdcopy_args(export, write=False), dest]
    if fmt != "qcow2":
        raise InvalidArgument(f"unknown format {fmt!r}: use raw or qcow2")
    if dest == "-":
        raise InvalidArgument("qcow2 cannot be written to stdout")
    _need("qemu-img", "qemu-utils")
    return ["qemu-img", "convert", "-p", "-W", *place.qemu_objects(), "-f", "raw", "-O", "qcow2",
            place.qemu_name(export), dest]


_QEMU_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_NBDCOPY_PROGRESS = re.compile(rb"(\d+)/100\n")


def run_copy(cmd: list[str], progress: Callable[[float], None] | None, stdout: int | None = None,
             stdin: int | None = None) -> str:
    """Run a copy tool, feeding its progress (0..100) to progress; returns its stderr on failure, else ''.

    qemu-img prints its progress on stdout, nbdcopy on the file descriptor it is given.
    """
    rfd, wfd = os.pipe()
    qemu = cmd[0] == "qemu-img"
    cmd = [c.replace(PROGRESS_FD, str(wfd)) for c in cmd]
    proc = subprocess.Popen(
        cmd, stdin=stdin if stdin is not None else subprocess.DEVNULL, stderr=subprocess.PIPE,
        stdout=wfd if qemu else (stdout if stdout is not None else subprocess.DEVNULL),
        pass_fds=() if qemu else (wfd,),
    )
    os.close(wfd)
    pattern = _QEMU_PROGRESS if qemu else _NBDCOPY_PROGRESS
    buf = b""
    try:
        with os.fdopen(rfd, "rb", buffering=0) as pipe:
            while True:
                block = pipe.read(4096)
                if not block:
                    break
                buf = (buf + block)[-256:]
                found = pattern.findall(buf)
                if found and progress is not None:
                    progress(float(found[-1]))  # may raise (a cancelled job): the copy stops
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        lines = err.strip().splitlines()
        if len(lines) > 1 and lines[-2].startswith("qemu-nbd: ") and "socket_activation" in lines[-1]:
            lines.pop()  # nbdcopy's qemu-nbd (NbdPlace.nbdcopy_args) said why; nbdcopy, only that it went
        return "\n".join(lines) or f"{cmd[0]} exited {proc.returncode}"
    return ""
