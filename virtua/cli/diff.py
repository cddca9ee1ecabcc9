"""Incremental backup: `volume export-diff` and `volume import-diff` (format in docs/storage.md).

The pool says which chunks changed between two snapshots (op volume.diff: same physical
chunk = same data, so this costs no reads); the data itself moves over NBD, through the
same way as import/export (serve's admin socket, its TCP port with TLS over --api, or an
in-process server).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from virtua.cli.client import Client
from virtua.cli.data import check_data_path, nbd_place
from virtua.cli.render import warn
from virtua.errors import AlreadyExists, Forbidden, InvalidArgument, NotFound, VirtuaError
from virtua.storage.names import parse_ref

MAGIC = b"virtua-diff v1\n"
RECORD = struct.Struct(">cQQ")  # tag, offset, length
DATA, ZEROS, END = b"D", b"Z", b"E"
PIECE = 4 << 20
CONNECT_TIMEOUT = 10.0  # connect and handshake: a serve that is there answers in milliseconds
IO_TIMEOUT = 600.0


@contextlib.contextmanager
def _nbd(home: Path, client: Client, export: str) -> Iterator[Any]:
    from virtua.nbd.client import NBDClient, OptionError
    from virtua.nbd.proto import REP_ERR_POLICY

    with nbd_place(home, client) as place:
        if place.socket is not None:
            c = NBDClient.connect(unix=place.socket, timeout=CONNECT_TIMEOUT).open(export, structured=False)
        else:  # a remote serve: TLS with the admin certificate, checking the peer is the manager
            from virtua.pki.credentials import MANAGER, Credentials

            assert place.certs is not None
            tls = Credentials(Path(place.certs)).client_context(MANAGER)
            c = NBDClient.connect(place.host, place.port, timeout=CONNECT_TIMEOUT)
            try:
                c.open(export, structured=False, tls=tls, tls_hostname=place.host)
            except OptionError as e:  # serve's policy (--allow), or no such export: one line, as nbdcopy's
                c.close()
                why = Forbidden if e.rep == REP_ERR_POLICY else InvalidArgument
                raise why(f"NBD at {place.host}:{place.port} refused {export}: {e.msg or 'no reason given'}") from None
            except BaseException:
                c.close()
                raise
        c.sock.settimeout(IO_TIMEOUT)  # a request may wait behind a busy pool, a handshake may not
        try:
            yield c
        finally:
            c.disconnect()


@contextlib.contextmanager
def _output(dest: str, force: bool) -> Iterator[IO[bytes]]:
    if dest == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(dest)
    if target.exists() and not force:
        raise AlreadyExists(f"{dest} already exists; use --force to overwrite it")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def export_diff(home: Path, client: Client, ref: str, dest: str, since: str | None, force: bool) -> dict[str, Any]:
    r = parse_ref(ref)
    check_data_path(client, "export-diff")
    if since is not None:
        since = since.rpartition("@")[2]
    diff = client.call("volume.diff", ref=ref, since=since)
    header = {"volume": f"{r.pool}/{r.volume}", "from": since, "to": r.snapshot, "size": diff["size"]}
    data = zeros = 0
    with _output(dest, force) as out, _nbd(home, client, str(r)) as nbd:
        out.write(MAGIC + json.dumps(header).encode() + b"\n")
        for offset, length, is_data in diff["runs"]:
            if not is_data:
                out.write(RECORD.pack(ZEROS, offset, length))
                zeros += length
                continue
            pos, end = offset, offset + length
            while pos < end:
                n = min(PIECE, end - pos)
                out.write(RECORD.pack(DATA, pos, n))
                out.write(nbd.read(pos, n))
                pos += n
            data += length
        out.write(RECORD.pack(END, 0, 0))
    return {"name": str(r), "from": since, "file": dest, "data": data, "zeroed": zeros, "size": diff["size"]}


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise InvalidArgument(f"{what}: the diff is truncated")
    return b


def import_diff(home: Path, client: Client, source: str, ref: str) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    check_data_path(client, "import-diff")
    if source != "-" and not os.path.isfile(source):
        raise NotFound(f"no such file: {source}")
    done: list[bool] = [False]
    with contextlib.ExitStack() as stack:
        _terminate_unwinds(stack)  # first: its handler is put back after the cleanups below
        f: IO[bytes] = sys.stdin.buffer if source == "-" else stack.enter_context(open(source, "rb"))
        if f.read(len(MAGIC)) != MAGIC:
            raise InvalidArgument(f"{source} is not a virtua diff (from `virtua volume export-diff`)")
        try:
            header = json.loads(f.readline())
            size, since, to = int(header["size"]), header["from"], header["to"]
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(f"{source}: bad diff header: {e}") from None
        volumes = {v["name"]: v for v in client.call("volume.list", pool=r.pool)}
        if str(r) not in volumes:
            if since is not None:
                raise NotFound(f"volume {r} does not exist; apply the full diff (the one without --from) first")
            client.call("volume.create", ref=ref, size=size)
            stack.callback(_remove_unless_done, client, ref, done)
        elif since is not None and since not in volumes[str(r)]["snapshots"]:
            raise InvalidArgument(f"{r} has no snapshot {since}: this diff applies on top of @{since}")
        elif since is None and volumes[str(r)]["allocated"]:
            raise InvalidArgument(f"{r} already holds data; a full diff goes into a new or empty volume")
        if str(r) in volumes and to is not None and to in volumes[str(r)]["snapshots"]:
            raise AlreadyExists(f"{r} already has snapshot {to}: this diff was applied already")
        if str(r) in volumes and volumes[str(r)]["size"] != size:
            client.call("volume.resize", ref=ref, size=size, shrink=True)
        data = zeros = 0
        if since is not None:
            stack.callback(_say_partly_applied, ref, since, done)
        with _nbd(home, client, str(r)) as nbd:
            while True:
                tag, offset, length = RECORD.unpack(_read_exact(f, RECORD.size, source))
                if tag == END:
                    break
                if offset + length > size:
                    raise InvalidArgument(f"{source}: a record lies past the end ({offset + length} > {size})")
                if tag == DATA:
                    nbd.write(offset, _read_exact(f, length, source))
                    data += length
                elif tag == ZEROS:
                    nbd.write_zeroes(offset, length)
                    zeros += length
                else:
                    raise InvalidArgument(f"{source}: unknown record {tag!r}")
            nbd.flush()
        if to is not None:
            client.call("snapshot.create", ref=f"{r}@{to}")
        done[0] = True
    info: dict[str, Any] = client.call("volume.info", ref=ref)
    info.update({"written": data, "zeroed": zeros, "applied_from": since, "snapshot_taken": to})
    return info


def _remove_unless_done(client: Client, ref: str, done: list[bool]) -> None:
    """A full diff that did not apply leaves no volume behind (it made the volume): a
    half-written one would look like a restored backup."""
    if not done[0]:
        with contextlib.suppress(VirtuaError):
            client.call("volume.rm", ref=ref, now=True, force=True)


def _say_partly_applied(ref: str, since: str, done: list[bool]) -> None:
    if not done[0]:
        warn(f"{ref} is partly changed by the diff that did not apply: "
             f"`virtua snapshot rollback {ref}@{since}` puts it back as it was")


def _terminate_unwinds(stack: contextlib.ExitStack) -> None:
    """SIGTERM (a `kill`, a service manager, a CI timeout) unwinds like Ctrl-C does, so a
    half-made volume is removed or the rollback named; its default action would end the
    process with neither. A second one while that runs is ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    seen: list[bool] = []

    def terminated(signum: int, frame: object) -> None:
        if not seen:
            seen.append(True)
            raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    stack.callback(signal.signal, signal.SIGTERM, previous)
