"""Image import/export for the CLI, with a progress bar on a terminal.

Data always moves over NBD, streamed by qemu-img convert (qcow2) or nbdcopy (raw): through
`virtua serve`'s private admin socket when it holds the pools, through its TCP port with
TLS and the admin certificate when it is reached with --api, else through a short-lived
in-process NBD server on a private unix socket. One code path, one behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from virtua.cli.client import Client, LocalClient, RemoteClient
from virtua.errors import (
    AlreadyExists,
    Cancelled,
    InvalidArgument,
    NoSpace,
    Unavailable,
    VirtuaError,
)
from virtua.storage import imageio
from virtua.storage.names import parse_ref
from virtua.units import SECTOR, format_size


@contextlib.contextmanager
def progress_bar(label: str, total: int) -> Iterator[Callable[[float], None]]:
    """A callback taking percent done; a bar on stderr when it is a terminal, else nothing."""
    if not sys.stderr.isatty():
        yield lambda percent: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda percent: bar.update(task, completed=int(total * percent / 100))


@contextlib.contextmanager
def nbd_place(home: Path, client: Client) -> Iterator[imageio.NbdPlace]:
    """Where every volume of the pools is an NBD export: serve's private unix socket (no
    TLS), a remote serve's TCP port (TLS with the admin certificate), or this process's
    own server on a private unix socket."""
    if isinstance(client, RemoteClient):
        if client.unix is None:
            yield remote_place(client, "copy")
            return
        from virtua.storage.home import admin_nbd_socket

        yield imageio.NbdPlace(socket=str(admin_nbd_socket(home)))
        return
    from virtua.nbd.testing import ServerThread
    from virtua.nbd.volumes import StorageExports

    assert isinstance(client, LocalClient)
    where = tempfile.mkdtemp(prefix="virtua-nbd-")  # 0700: only we can connect
    path = os.path.join(where, "nbd.sock")
    try:
        exports = StorageExports(client.storage, {})
        # the command says what failed, once, as it does through serve; a bug still shows
        quiet = logging.getLogger("virtua.nbd.in-process")
        quiet.setLevel(logging.ERROR)
        with ServerThread(exports, host=None, port=None, unix_path=path, holders=client.storage.holders, log=quiet):
            yield imageio.NbdPlace(socket=path)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def remote_place(client: RemoteClient, verb: str) -> imageio.NbdPlace:
    """A serve reached over TCP (--api) takes data on its NBD port, over TLS with the
    admin certificate (the export policy lets `admin` open any export). What it needs is
    checked here, before anything starts: never this machine's socket, which may be
    another serve's with a volume of the same name."""
    if client.nbd_place is not None:
        return client.nbd_place
    if client.cert is None:
        raise InvalidArgument(f"volume {verb} over --api needs --cert DIR (the admin certificate): the data goes "
                              "over NBD with TLS, which takes a certificate, not the API token")
    status = client.status()
    if "nbd" not in status:
        raise Unavailable(f"volume {verb} over --api: that serve is older than this CLI (its /v1/status does not "
                          "say where its NBD listens); upgrade it, or run the command on the serve's host")
    nbd = status["nbd"]
    if not nbd:
        raise InvalidArgument(f"volume {verb} over --api: that serve does not take NBD over TCP (--listen); "
                              "run it on the serve's host")
    # another program's answer: what goes into nbdcopy's URI is an address and a port, or nothing
    listen, port = (nbd.get("host") or "", nbd.get("port")) if isinstance(nbd, dict) else (None, None)
    if not (isinstance(listen, str) and re.fullmatch(r"[A-Za-z0-9.:-]{0,253}", listen)
            and type(port) is int and 0 < port < 65536):
        raise Unavailable(f"virtua serve says its NBD listens on {str(nbd)[:200]!r}: not an address and port")
    if nbd.get("tls") == "off" or not nbd.get("cluster_ca"):
        raise InvalidArgument(f"volume {verb} over --api: that serve's NBD does not use TLS with the cluster CA "
                              "(--tls auto), so the admin certificate cannot open its exports; run it on the serve's host")
    host = _nbd_host(listen, client.http.base_url.host, verb)
    place = imageio.NbdPlace(host=host, port=port, certs=str(client.cert))
    client.nbd_place = place
    return place


@contextlib.contextmanager
def _source_file(source: str) -> Iterator[str]:
    """The file to import: the path itself, or stdin spooled to a sparse file."""
    if source != "-":
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="virtua-import-") as tmp:
        path = os.path.join(tmp, "stdin.raw")
        with open(path, "wb") as f:
            imageio._copy_sparse_stream(sys.stdin.buffer, f)
        yield path


def _nbd_host(listen: str, api_host: str, verb: str) -> str:
    """Where to reach serve's NBD: the address it listens on, or (a wildcard) the one its
    API was reached at. NBD on loopback only is unreachable from elsewhere, and this
    machine's own loopback may be another serve's."""
    import ipaddress
    import socket

    def address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        # as serve's bind reads it (getaddrinfo): `::0`, `0` and `127.1` are addresses too
        try:
            found = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
            return ipaddress.ip_address(str(found[0][4][0]).partition("%")[0])
        except (OSError, ValueError, IndexError):
            return None

    def loopback(host: str) -> bool:
        ip = address(host)
        return host.lower() == "localhost" or (ip is not None and ip.is_loopback)

    listen_ip = address(listen)
    if listen == "" or (listen_ip is not None and listen_ip.is_unspecified):
        return api_host
    nbd_local = loopback(listen)
    if nbd_local and not loopback(api_host):
        raise InvalidArgument(f"volume {verb} over --api: that serve takes NBD on {listen} only; run it on the "
                              "serve's host, or start serve with --listen ADDRESS:PORT")
    return api_host if nbd_local else listen


def check_data_path(client: Client, verb: str) -> None:
    """Before anything starts: a remote serve (--api) can take this command's data."""
    if is_remote(client):
        assert isinstance(client, RemoteClient)
        remote_place(client, verb)


def is_remote(client: Client) -> bool:
    """A serve reached over TCP: on another machine, or as good as (its files are not ours)."""
    return isinstance(client, RemoteClient) and client.unix is None


def import_image(home: Path, client: Client, source: str, ref: str, stream_size: int | None = None) -> dict[str, Any]:
    parse_ref(ref, snapshot=False)  # a bad name before anything is read
    check_data_path(client, "import")
    if stream_size is not None:
        return _import_stream(home, client, ref, stream_size)
    with _source_file(source) as path:
        image = imageio.probe(path)
        shown = "stdin" if source == "-" else source
        # what was free before the copy: a failed one has filled the pool by then (over NBD)
        free = client.call("pool.info", name=parse_ref(ref).pool)["free"]

        def failed(err: str, pool: str) -> VirtuaError:
            if "No space left" in err:  # over NBD, or the pool's own copy of the file: one message
                return NoSpace(f"pool {pool} is full: {shown} needs more than its {format_size(free)} free")
            return InvalidArgument(f"cannot import {shown}: {_last_line(err)}")

        def copy(place: imageio.NbdPlace, job_progress: Callable[[float], None]) -> str:
            with progress_bar(f"import {ref}", image.virtual_size) as bar:
                def both(percent: float) -> None:
                    bar(percent)
                    job_progress(percent)

                return imageio.run_copy(imageio.import_command(image, place, str(parse_ref(ref))), both)

        # a remote serve cannot read a file of this machine: the data goes over NBD
        local_file = None if is_remote(client) else path
        return _into_new_volume(home, client, ref, image.virtual_size, image.format, copy, failed, shown, local_file)


COPY_SLACK = 64 << 20  # less free than this after a failed copy: the pool filled up


def _import_stream(home: Path, client: Client, ref: str, size: int) -> dict[str, Any]:
    """stdin (raw) straight into a new volume of the given size: no temporary copy, like
    `rbd import -`. More than `size` bytes is refused; fewer leave the rest zero."""

    def failed(err: str, pool: str) -> VirtuaError:
        if "No space left" in err:  # NBD's answer to a write past the end, and to a full pool
            free = client.call("pool.info", name=pool)["free"]
            if free < COPY_SLACK:
                return NoSpace(f"pool {pool} is full: stdin needs more than its {format_size(free)} free")
            return InvalidArgument(f"stdin holds more than --size {format_size(size)}: give its size")
        return InvalidArgument(f"cannot import stdin: {_last_line(err)}")

    def copy(place: imageio.NbdPlace, job_progress: Callable[[float], None]) -> str:
        return imageio.run_copy(imageio.stream_import_command(place, str(parse_ref(ref))), job_progress,
                                stdin=sys.stdin.fileno())

    return _into_new_volume(home, client, ref, size, "raw", copy, failed, "stdin")


def _into_new_volume(
    home: Path, client: Client, ref: str, size: int, fmt: str,
    copy: Callable[[imageio.NbdPlace, Callable[[float], None]], str],
    failed: Callable[[str, str], VirtuaError], source: str = "an image", local_file: str | None = None,
) -> dict[str, Any]:
    """An import job: the daemon (or this process) creates ref (size rounded up to a
    sector) and records it; copy(its NBD URI, a percent callback) fills it while a thread
    renews the job; the job ends by keeping the volume, or by removing it when the copy
    fails (failed(stderr, pool) says why), is cancelled (`virtua job cancel`) or this
    process dies (the job's lease runs out, or the next start finds its owner gone)."""
    r = parse_ref(ref, snapshot=False)
    size = (size + SECTOR - 1) // SECTOR * SECTOR
    job = str(client.call("volume.import.begin", ref=ref, size=size, format=fmt, source=source)["job"])
    lock = threading.Lock()  # one call at a time on the client
    done: list[int | None] = [0]  # None: the daemon copies, and says how far it is
    cancel = threading.Event()
    bar_of_daemon: list[Callable[[float], None]] = [lambda percent: None]

    def answered(answer: dict[str, Any]) -> None:
        if answer.get("cancel"):
            cancel.set()
        if done[0] is None and size:
            bar_of_daemon[0](100 * int(answer.get("done") or 0) / size)

    def progress(percent: float) -> None:
        done[0] = int(size * percent / 100)
        if cancel.is_set():
            raise Cancelled(f"job {job} was cancelled; {ref} is removed")

    try:
        with _renewing(client, job, lock, done, answered):
            copied = False
            if local_file is not None:
                done[0] = None
                with progress_bar(f"import {ref}", size) as bar:
                    bar_of_daemon[0] = bar
                    try:
                        copied = _copy_file_in(client, job, local_file, lock)
                    except NoSpace as e:
                        raise failed("No space left", r.pool) from e
                    bar_of_daemon[0] = lambda percent: None
                done[0] = 0
            if not copied:
                with nbd_place(home, client) as place:
                    err = copy(place, progress)
                if err:
                    raise failed(err, r.pool)
    except BaseException as e:
        with contextlib.suppress(VirtuaError), lock:
            client.call("volume.import.end", id=job, error=e.message if isinstance(e, VirtuaError) else repr(e))
        raise
    with lock:
        info: dict[str, Any] = client.call("volume.import.end", id=job)
    info["written"] = info["allocated"]
    info["format"] = fmt
    info["job"] = job
    info["via"] = "file" if copied else "nbd"  # the daemon copied the file itself, or NBD carried it
    return info


RENEW_EVERY = 1.0


@contextlib.contextmanager
def _renewing(
    client: Client, job: str, lock: threading.Lock, done: list[int | None],
    answered: Callable[[dict[str, Any]], None] = lambda answer: None,
) -> Iterator[None]:
    """While the block runs, a thread renews a client-driven job every RENEW_EVERY with
    how far it is (done[0]): its lease must not run out under a copy that is still going,
    and must run out soon when this process dies. answered() sees each reply."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_EVERY):
            with contextlib.suppress(VirtuaError), lock:
                answered(client.call("job.renew", id=job, done=done[0]))

    renewer = threading.Thread(target=renew, name=f"virtua-renew-{job}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


def _copy_file_in(client: Client, job: str, path: str, lock: threading.Lock) -> bool:
    """The daemon (or this process) copies the file itself, no NBD between (see
    virtua.storage.filecopy); False when it cannot, and says why in the log. Through
    serve the call runs unlocked: the renewing thread meanwhile asks how far it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # the NBD copy gives the error a person reads
    try:
        st = os.fstat(fd)
        args = {"id": job, "path": os.path.abspath(path), "device": st.st_dev, "inode": st.st_ino}
        if isinstance(client, LocalClient):
            with lock:
                answer = client.call("volume.import.file", **args)
        else:
            answer = client.call("volume.import.file", **args)
    finally:
        os.close(fd)
    if not answer.get("copied"):
        logging.getLogger("virtua.cli").info("import over NBD: %s", answer.get("why"))
        return False
    return True


def export_image(
    home: Path, client: Client, ref: str, dest: str, fmt: str, force: bool = False, sync: bool = True,
) -> dict[str, Any]:
    r = parse_ref(ref)
    check_data_path(client, "export")
    if fmt not in ("raw", "qcow2"):
        raise InvalidArgument(f"unknown format {fmt!r}: use raw or qcow2")
    if fmt == "qcow2" and dest == "-":
        raise InvalidArgument("qcow2 cannot be written to stdout")
    size = _size_of(client, ref)
    tmp = None
    if dest != "-":
        target = Path(dest)
        if target.is_dir():
            raise InvalidArgument(f"{dest} is a directory; give a file name")
        if target.exists() and not force:
            raise AlreadyExists(f"{dest} already exists; use --force to overwrite it")
        if not target.parent.is_dir():
            raise InvalidArgument(f"cannot write {dest}: directory {target.parent} does not exist")
        # write beside it under a temporary name; rename only a complete copy
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would create it, not mkstemp's 0600
    try:
        via = "nbd"
        if tmp is not None:
            err, via = _export_held(home, client, str(r), tmp, fmt, size, sync)
        else:
            with nbd_place(home, client) as place, progress_bar(f"export {ref}", size) as bar:
                cmd = imageio.export_command(place, str(r), "-", fmt)
                err = imageio.run_copy(cmd, bar, stdout=sys.stdout.fileno())
        if err:
            if "No space left" in err or "Disk quota" in err:
                raise NoSpace(f"no space left to write {dest}: its filesystem is full")
            if tmp is None and ("Broken pipe" in err or "EPIPE" in err):
                raise InvalidArgument("export to stdout: the reader closed the pipe")
            raise InvalidArgument(f"cannot export {ref} to {dest}: {_last_line(err)}")
        result: dict[str, Any] = {"name": str(r), "file": dest, "format": fmt, "size": size, "via": via}
        if tmp is not None:
            if sync:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, dest)
            tmp = None
            result["file_size"] = os.path.getsize(dest)
        return result
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _export_held(
    home: Path, client: Client, ref: str, dest: str, fmt: str, size: int, sync: bool = True,
) -> tuple[str, str]:
    """Export to a file as a job that holds the image still (volume.export.begin: a
    volume through a snapshot of this moment). For qcow2, qemu-img reads the runs of the
    pool's data file itself (virtua.storage.filecopy) where it can; raw, and the rest,
    read the held image over NBD. Returns the copy's stderr on failure (else '') and which way it went (file, nbd)."""
    from virtua.storage import filecopy

    begin = client.call("volume.export.begin", ref=ref)
    job = str(begin["job"])
    held = ref if "@" in ref else f"{ref}@export-{job}"
    lock = threading.Lock()
    done: list[int | None] = [0]

    def progress(bar: Callable[[float], None]) -> Callable[[float], None]:
        def both(percent: float) -> None:
            bar(percent)
            done[0] = int(size * percent / 100)
        return both

    err = ""
    try:
        with _renewing(client, job, lock, done):
            extents = begin["extents"]
            with progress_bar(f"export {ref}", size) as bar:
                # raw: nbdcopy over NBD (of the held snapshot) beats qemu-img writing a raw
                # file here (ext4: 0.96 s against 1.34 s a GiB, both durable)
                local = not is_remote(client)  # the pool's data file is on this machine
                if fmt == "qcow2" and local and begin.get("data_file") and len(extents) <= filecopy.MAX_SOURCES:
                    _enough_files(len(extents) + 64)
                    # in order (-W fragments a raw file on ext4), and past the page cache where
                    # the file system can: the fsync that makes the export durable is then free
                    cache = ["-t", "none"] if sync and _direct_io(dest) else []
                    cmd = ["qemu-img", "convert", "-p", *cache, "-O", fmt,
                           *filecopy.concat_sources(str(begin["data_file"]), extents), dest]
                    err = imageio.run_copy(cmd, progress(bar))
                    if err and "Could not open" in err:  # the pool's data file is not ours to read
                        logging.getLogger("virtua.cli").info("export over NBD: %s", _last_line(err))
                        with contextlib.suppress(OSError):
                            os.truncate(dest, 0)
                    else:
                        return err, "file"
                with nbd_place(home, client) as place:
                    cmd = imageio.export_command(place, held, dest, fmt)
                    err = imageio.run_copy(cmd, progress(bar))
            return err, "nbd"
    finally:
        with lock:
            if err:
                with contextlib.suppress(VirtuaError):
                    client.call("volume.export.end", id=job, error=_last_line(err)[:2000])
            else:
                client.call("volume.export.end", id=job)


def _direct_io(path: str) -> bool:
    """Whether path's file system takes O_DIRECT (tmpfs does not)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def _enough_files(n: int) -> None:
    """Let qemu-img (our child) open n files: one per window of the data file."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))


def _size_of(client: Client, ref: str) -> int:
    r = parse_ref(ref)
    if r.snapshot is None:
        return int(client.call("volume.info", ref=ref)["size"])
    for s in client.call("snapshot.list", ref=f"{r.pool}/{r.volume}"):
        if s["name"] == str(r):
            return int(s["size"])
    from virtua.errors import NotFound

    raise NotFound(f"snapshot {r} does not exist")


def _last_line(err: str) -> str:
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else err
