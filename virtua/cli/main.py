"""The `virtua` command: a thin shell over virtua.api.ops (and, for data, the storage API)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from virtua.cli import render
from virtua.cli.client import Client, connect
from virtua.errors import InvalidArgument, VirtuaError
from virtua.storage.home import default_home
from virtua.units import parse_size

app = typer.Typer(no_args_is_help=True, help="virtua: storage virtualization and virtual clusters")
pool_app = typer.Typer(no_args_is_help=True, help="Storage pools")
volume_app = typer.Typer(no_args_is_help=True, help="Thin volumes")
snapshot_app = typer.Typer(no_args_is_help=True, help="Snapshots (POOL/VOLUME@SNAPSHOT)")
app.add_typer(pool_app, name="pool")
app.add_typer(volume_app, name="volume")
app.add_typer(snapshot_app, name="snapshot")
trash_app = typer.Typer(no_args_is_help=True, help="Removed volumes, kept for a while (volume rm without --now)")
app.add_typer(trash_app, name="trash")
job_app = typer.Typer(no_args_is_help=True, help="Admin jobs: recorded, undone on failure or after a crash")
app.add_typer(job_app, name="job")


class State:
    home: Path = default_home()
    json: bool = False
    api: str | None = None  # https://HOST:PORT: a remote manager, over mTLS
    cert: Path | None = None  # the credentials directory for it
    token_file: Path | None = None  # or the admin token (with the CA to verify the manager)
    ca: Path | None = None
    _client: Client | None = None

    @classmethod
    def client(cls) -> Client:
        if cls._client is None:
            cls._client = connect(cls.home, cls.api, cls.cert, cls.token_file, cls.ca)
        return cls._client


def call(op: str, columns: list[str] | None = None, **args: Any) -> Any:
    result = State.client().call(op, **{k: v for k, v in args.items() if v is not None})
    render.emit(result, State.json, columns)
    return result


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("virtua")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        render.out.print(f"virtua {version()}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _global(
    home: Path | None = typer.Option(None, "--home", help="state directory (default $VIRTUA_HOME or ~/.local/share/virtua)"),
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"),
    api: str | None = typer.Option(None, "--api", help="a manager over TCP, https://HOST:8780 (default: the local unix socket)"),
    cert: Path | None = typer.Option(None, "--cert", help="credentials directory for --api: ca-cert.pem, client-cert.pem, client-key.pem (the manager's $VIRTUA_HOME/pki/admin)"),
    token_file: Path | None = typer.Option(None, "--token-file", help="instead of --cert: the admin token (the manager's $VIRTUA_HOME/pki/admin-token)"),
    ca: Path | None = typer.Option(None, "--ca", help="with --token-file: the cluster CA certificate (pki/ca-cert.pem) that verifies the manager"),
) -> None:
    if home is not None:
        State.home = home
    State.api = api
    State.cert = cert
    State.token_file = token_file
    State.ca = ca


# ---------------------------------------------------------------------- pools

POOL_COLUMNS = ["name", "capacity", "used", "free", "used_percent", "provisioned", "overcommit", "volumes", "snapshots", "path"]


@pool_app.command("create")
def pool_create(
    name: str,
    path: str | None = typer.Option(None, "--path", help="directory for the pool's files"),
    capacity: str | None = typer.Option(None, "--capacity", help="e.g. 100G (default: free space of the directory)"),
    chunk_size: str | None = typer.Option(None, "--chunk-size", help="allocation unit, power of two 4K..16M (default 64K)"),
    overcommit: float | None = typer.Option(None, "--overcommit", help="max provisioned/capacity ratio (default 20)"),
) -> None:
    """Create a pool."""
    call("pool.create", name=name, path=path, capacity=capacity, chunk_size=chunk_size, overcommit=overcommit)


@pool_app.command("list")
def pool_list() -> None:
    """List pools with capacity and usage."""
    call("pool.list", POOL_COLUMNS)


@pool_app.command("info")
def pool_info(name: str) -> None:
    """Show a pool's capacity, usage and contents."""
    call("pool.info", name=name)


@pool_app.command("check")
def pool_check(
    name: str,
    repair: bool = typer.Option(False, "--repair", help="wipe data no volume owns (leaked, stale chunks)"),
) -> None:
    """Verify reference counts, chunk ownership and every allocated byte of the data file;
    exit 1 on any problem (after --repair: on any it could not repair)."""
    result = call("pool.check", name=name, repair=repair)
    if not result["ok"]:
        raise typer.Exit(1)


@pool_app.command("rm")
def pool_rm(name: str, force: bool = typer.Option(False, "--force", help="also when it has volumes")) -> None:
    """Delete a pool and its files."""
    call("pool.rm", name=name, force=force)


# ---------------------------------------------------------------------- volumes

VOLUME_COLUMNS = ["name", "size", "allocated", "unique", "shared", "origin", "snapshots"]


@volume_app.command("create")
def volume_create(ref: str, size: str = typer.Option(..., "--size", help="virtual size, e.g. 10G")) -> None:
    """Create a thin volume POOL/VOLUME."""
    call("volume.create", ref=ref, size=size)


@volume_app.command("list")
def volume_list(pool: str | None = typer.Argument(None)) -> None:
    """List volumes (of one pool, or all)."""
    call("volume.list", VOLUME_COLUMNS, pool=pool)


@volume_app.command("info")
def volume_info(ref: str) -> None:
    """Size, allocation, what is unique and shared, origin and children."""
    call("volume.info", ref=ref)


IN_USE = "also while an NBD client (a VM, qemu-io, ...) has it open"


@volume_app.command("resize")
def volume_resize(
    ref: str,
    size: str = typer.Option(..., "--size"),
    shrink: bool = typer.Option(False, "--shrink", help="allow shrinking (data past the end is lost)"),
    force: bool = typer.Option(False, "--force", help=f"allow shrinking, {IN_USE}"),
) -> None:
    """Grow (or, with --shrink, shrink) a volume."""
    call("volume.resize", ref=ref, size=size, shrink=shrink, force=force)


@volume_app.command("rm")
def volume_rm(
    ref: str,
    recursive: bool = typer.Option(False, "--recursive", "-r", help="also its snapshots (and, with --now, their clones)"),
    now: bool = typer.Option(False, "--now", help="delete at once instead of moving it to the trash"),
    keep: str = typer.Option("7d", "--keep", help="how long the trash keeps it: 30m, 12h, 7d, ..."),
    force: bool = typer.Option(False, "--force", help=IN_USE),
) -> None:
    """Move a volume to the pool's trash (restorable; deleted when --keep runs out), or with --now delete it.

    Refused while snapshots or clones depend on it, a snapshot is protected, or it is open."""
    call("volume.rm", ref=ref, recursive=recursive, force=force, now=now, keep=None if now else keep)


@volume_app.command("rename")
def volume_rename(ref: str, new: str = typer.Argument(..., help="NEW or POOL/NEW (same pool)"),
                  force: bool = typer.Option(False, "--force", help=IN_USE)) -> None:
    """Rename POOL/VOLUME (its NBD export follows the new name)."""
    call("volume.rename", ref=ref, new=new, force=force)


@volume_app.command("copy")
def volume_copy(source: str = typer.Argument(..., help="POOL/VOLUME or POOL/VOLUME@SNAPSHOT"),
                new: str = typer.Argument(..., help="POOL/NEW (same pool)")) -> None:
    """A deep, independent copy (not a clone): allocated data only, holes stay holes."""
    call("volume.copy", source=source, new=new)


@volume_app.command("du")
def volume_du(ref: str) -> None:
    """Space per snapshot and for the head: provisioned, and what each one alone wrote (rbd du)."""
    call("volume.du", ["name", "provisioned", "used"], ref=ref)


@volume_app.command("export-diff")
def volume_export_diff(
    ref: str = typer.Argument(..., help="POOL/VOLUME@SNAPSHOT (or POOL/VOLUME: the head)"),
    dest: str = typer.Argument(..., help="diff file, or - for stdout"),
    since: str | None = typer.Option(None, "--from", help="older snapshot of the same volume (default: everything)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing file"),
) -> None:
    """Write what changed since --from (incremental backup); `volume import-diff` applies it."""
    from virtua.cli import diff

    result = diff.export_diff(State.home, State.client(), ref, dest, since, force)
    if dest != "-":
        render.emit(result, State.json)


@volume_app.command("import-diff")
def volume_import_diff(
    source: str = typer.Argument(..., help="diff file from export-diff, or - for stdin"),
    ref: str = typer.Argument(..., help="POOL/VOLUME to apply it to (created by a full diff)"),
) -> None:
    """Apply a diff: the volume must have the diff's --from snapshot; ends by taking its snapshot."""
    from virtua.cli import diff

    render.emit(diff.import_diff(State.home, State.client(), source, ref), State.json)


@volume_app.command("reset")
def volume_reset(ref: str, force: bool = typer.Option(False, "--force", help=IN_USE)) -> None:
    """Throw away a clone's changes: back to the snapshot it was cloned from."""
    call("volume.reset", ref=ref, force=force)


@volume_app.command("rebase")
def volume_rebase(ref: str, target: str, force: bool = typer.Option(False, "--force", help=IN_USE)) -> None:
    """Point a clone at another snapshot (POOL/TEMPLATE@NEWSNAP); its private changes are discarded."""
    call("volume.rebase", ref=ref, target=target, force=force)


@volume_app.command("flatten")
def volume_flatten(
    ref: str, force: bool = typer.Option(False, "--force", help=IN_USE),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the job to its end (else print its ID; "
                                                             "with `virtua serve` running)"),
) -> None:
    """Copy what a clone shares with its origin, making it independent. A job (`virtua job
    list`): cancelled or interrupted, the clone reads the same, partly detached."""
    from virtua.cli.client import RemoteClient

    client = State.client()
    if not isinstance(client, RemoteClient):  # in this process: it runs to its end
        call("volume.flatten", ref=ref, force=force)
        return
    began = client.call("volume.flatten", ref=ref, force=force, wait=False)
    if not wait:
        render.emit(began, State.json)
        return
    from virtua.cli.follow import follow

    render.emit(follow(client, began["job"], f"flatten {ref}", name_job=False)["result"], State.json)


CONNECTION_COLUMNS = ["export", "client", "tls_identity", "since", "bytes_read", "bytes_written"]


@volume_app.command("status")
def volume_status(ref: str) -> None:
    """Who has POOL/VOLUME (or its snapshots) open over NBD: client, TLS identity, since, bytes."""
    result = State.client().call("volume.status", ref=ref)
    if State.json:
        render.emit(result, True)
    elif result["connections"]:
        render.emit(result["connections"], False, CONNECTION_COLUMNS)
    else:
        render.out.print(f"{result['name']}: no open connections")


@volume_app.command("import")
def volume_import(
    source: str = typer.Argument(..., help="image file (raw, qcow2, or any format qemu-img reads), or - for stdin (raw)"),
    ref: str = typer.Argument(..., help="POOL/VOLUME to create"),
    size: str | None = typer.Option(
        None, "--size", help="stdin only: the volume's size; the data streams straight in (else it is spooled first)"
    ),
) -> None:
    """Create POOL/VOLUME from an image, checked first (a damaged one is refused); zeros stay unallocated."""
    from virtua.cli import data

    if size is not None and source != "-":
        raise InvalidArgument("--size is for an import from stdin (-): a file's size is its own")
    result = data.import_image(State.home, State.client(), source, ref,
                               stream_size=parse_size(size) if size is not None else None)
    render.emit(result, State.json)


@volume_app.command("export")
def volume_export(
    ref: str = typer.Argument(..., help="POOL/VOLUME or POOL/VOLUME@SNAPSHOT"),
    dest: str = typer.Argument(..., help="file, or - for stdout"),
    fmt: str = typer.Option("raw", "--format", "-O", help="raw or qcow2"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing file"),
    no_sync: bool = typer.Option(False, "--no-sync", help="leave the file in the page cache, as qemu-img convert "
                                 "and cp do (faster on disks; a power cut can lose it after the command returns)"),
) -> None:
    """Write a volume or snapshot to a sparse raw file, stdout, or qcow2 (complete or not at
    all; on disk before the command returns unless --no-sync)."""
    from virtua.cli import data

    result = data.export_image(State.home, State.client(), ref, dest, fmt, force, sync=not no_sync)
    if dest != "-":
        render.emit(result, State.json)


@app.command("clone")
def clone(
    source: str = typer.Argument(..., help="POOL/VOLUME@SNAPSHOT, or POOL/VOLUME (takes a snapshot)"),
    new: str = typer.Argument(..., help="POOL/NEW"),
    count: int = typer.Option(1, "--count", "-n", help="make NEW-1 ... NEW-N"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check and print the plan; change nothing"),
) -> None:
    """Writable copy-on-write clones, O(1) each; a recorded job (`virtua job list`)."""
    call("clone", source=source, new=new, count=count, dry_run=dry_run or None)


# ---------------------------------------------------------------------- jobs

JOB_COLUMNS = ["id", "op", "state", "step", "title", "error"]


@job_app.command("list")
def job_list(all_: bool = typer.Option(False, "--all", help="also the ended ones (the latest 50)")) -> None:
    """Running admin jobs (imports, clone batches, flatten, template builds, VC create and start)."""
    call("job.list", JOB_COLUMNS, state="all" if all_ else None)


@job_app.command("show")
def job_show(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """A job's plan, current step, progress, and its result or error."""
    job = State.client().call("job.show", id=job_id)
    render.emit(job if State.json else human_job(job), State.json)


def human_job(job: dict[str, Any]) -> dict[str, Any]:
    """A job record as a person reads it: one line per step, progress with its unit."""
    from virtua.units import format_size

    out = dict(job)
    out["steps"] = "; ".join(f"{s['state']}: {s['name']}" + (f" ({s['error']})" if s.get("error") else "")
                             for s in job.get("steps") or []) or "-"
    p = job.get("progress") or {}
    done, total, unit = p.get("done", 0), p.get("total", 0), p.get("unit", "steps")
    shown = (lambda n: format_size(n)) if unit == "bytes" else str
    out["progress"] = f"{shown(done)} of {shown(total)}" + (f" {unit}" if unit != "bytes" else "") + (
        f" ({100 * done // total}%)" if total else "")
    out["args"] = ", ".join(f"{k}={v}" for k, v in (job.get("args") or {}).items()) or "-"
    if isinstance(job.get("result"), dict):
        out["result"] = ", ".join(f"{k}={render.fmt(k, v)}" for k, v in job["result"].items() if k != "job") or "-"
    return out


@job_app.command("cancel")
def job_cancel(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Stop a running job; the steps it finished are undone."""
    call("job.cancel", id=job_id)


# ---------------------------------------------------------------------- snapshots


@snapshot_app.command("create")
def snapshot_create(ref: str) -> None:
    """Snapshot POOL/VOLUME@SNAPSHOT (O(1))."""
    call("snapshot.create", ref=ref)


@snapshot_app.command("list")
def snapshot_list(ref: str) -> None:
    """Snapshots of POOL/VOLUME."""
    call("snapshot.list", ["name", "size", "created", "clones"], ref=ref)


@snapshot_app.command("rm")
def snapshot_rm(
    ref: str,
    recursive: bool = typer.Option(False, "--recursive", "-r", help="also its clones"),
    force: bool = typer.Option(False, "--force", help=IN_USE),
) -> None:
    """Delete a snapshot; refused while clones depend on it, or while it is open."""
    call("snapshot.rm", ref=ref, recursive=recursive, force=force)


@snapshot_app.command("rename")
def snapshot_rename(ref: str, new: str = typer.Argument(..., help="NEW snapshot name")) -> None:
    """Rename POOL/VOLUME@SNAPSHOT."""
    call("snapshot.rename", ref=ref, new=new)


@snapshot_app.command("protect")
def snapshot_protect(ref: str) -> None:
    """Protect a snapshot: it (and its volume) cannot be removed until unprotected."""
    call("snapshot.protect", ref=ref, on=True)


@snapshot_app.command("unprotect")
def snapshot_unprotect(ref: str) -> None:
    """Allow a protected snapshot to be removed again."""
    call("snapshot.protect", ref=ref, on=False)


@snapshot_app.command("rollback")
def snapshot_rollback(ref: str, force: bool = typer.Option(False, "--force", help=IN_USE)) -> None:
    """Return POOL/VOLUME to POOL/VOLUME@SNAPSHOT (later changes are lost)."""
    call("snapshot.rollback", ref=ref, force=force)


# ---------------------------------------------------------------------- trash


@trash_app.command("list")
def trash_list(pool: str | None = typer.Argument(None)) -> None:
    """Volumes in the trash: name, size, when removed, when they go for good."""
    call("trash.list", ["name", "size", "snapshots", "deleted", "expires"], pool=pool)


@trash_app.command("restore")
def trash_restore(ref: str, name: str | None = typer.Option(None, "--name", help="restore under another name")) -> None:
    """Bring POOL/VOLUME back from the trash."""
    call("trash.restore", ref=ref, name=name)


@trash_app.command("purge")
def trash_purge(pool: str, all_: bool = typer.Option(False, "--all", help="also what has time left")) -> None:
    """Delete trashed volumes whose time is up (or, with --all, every one)."""
    call("trash.purge", pool=pool, all=all_)


# ---------------------------------------------------------------------- entry point

JSON_HELP = "--json (anywhere on the line): print the result as JSON, sizes in bytes."


def _polish(cmd: Any, root: bool = False) -> Any:
    """Every command documents --json (main() takes it off the line before parsing)."""
    from typer.core import TyperGroup

    if cmd.name not in ("serve", "agent") and (root or not isinstance(cmd, TyperGroup)):
        cmd.epilog = JSON_HELP
    for sub in getattr(cmd, "commands", {}).values():
        _polish(sub)
    return cmd


_GLOBAL_VALUED = ("--home", "--api", "--cert", "--token-file", "--ca")


def _command_named(args: list[str]) -> str | None:
    """The command or group the line names, if it is sure to need no other: building
    typer's whole tree of ~70 commands costs every invocation tens of milliseconds."""
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("-"):
            return a
        if a in _GLOBAL_VALUED:
            i += 2
        elif a.split("=", 1)[0] in _GLOBAL_VALUED:
            i += 1
        else:  # --help, --version, completion, or a mistake: the root with everything
            return None
    return None


def _tree(args: list[str]) -> Any:
    """The click command for this line: only the group or command it names (the same
    command as in the whole tree), or the whole tree when the root itself must answer."""
    name = _command_named(args)
    groups = [g for g in app.registered_groups if g.name == name]
    commands = [c for c in app.registered_commands
                if (c.name or getattr(c.callback, "__name__", "").replace("_", "-")) == name]
    if name is None or not (groups or commands):
        return typer.main.get_command(app)
    whole = app.registered_groups, app.registered_commands
    app.registered_groups, app.registered_commands = groups, commands
    try:
        return typer.main.get_command(app)
    finally:
        app.registered_groups, app.registered_commands = whole


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--json" in args:  # accepted anywhere, for every command
        State.json = True
        args = [a for a in args if a != "--json"]
    from virtua.cli import cluster, daemon  # noqa: F401  (register their commands)
    try:
        # without standalone mode click returns a typer.Exit's code instead of exiting
        code = _polish(_tree(args), root=True).main(args=args, prog_name="virtua", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except VirtuaError as e:
        if State.json:
            import json

            sys.stdout.write(json.dumps(e.to_dict()) + "\n")
        render.err.print(f"virtua: error: {render.printable(e.message)}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code or 0)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:  # a file or socket the command was pointed at
        where = f": {e.filename}" if e.filename else ""
        render.err.print(f"virtua: error: {e.strerror or e}{where}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except Exception as e:  # usage errors (typer's click): one line, like every other error
        from typer import _click

        if isinstance(e, _click.exceptions.NoArgsIsHelpError) and e.ctx is not None:
            render.out.print(e.ctx.get_help(), highlight=False, markup=False)
            sys.exit(2)
        if isinstance(e, _click.exceptions.UsageError):
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            message = e.format_message().replace("\n", " ")
            render.err.print(f"virtua: error: {render.printable(message)}{hint}", highlight=False, markup=False, soft_wrap=True)
            sys.exit(2)
        if isinstance(e, _click.exceptions.ClickException):
            render.err.print(f"virtua: error: {e.format_message()}", highlight=False, markup=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if isinstance(e, typer.Abort):
            sys.exit(1)
        raise
    finally:
        if State._client is not None:
            State._client.close()
