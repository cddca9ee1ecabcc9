"""The `virtua` command: a thin shell over virtua.api.ops (and, for data, the storage API)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from virtua.cli import render
from virtua.cli.client import Client, connect
from virtua.errors import VirtuaError
from virtua.storage.service import default_home

app = typer.Typer(no_args_is_help=True, add_completion=False, help="virtua: storage virtualization and virtual clusters")
pool_app = typer.Typer(no_args_is_help=True, help="Storage pools")
volume_app = typer.Typer(no_args_is_help=True, help="Thin volumes")
snapshot_app = typer.Typer(no_args_is_help=True, help="Snapshots (POOL/VOLUME@SNAPSHOT)")
app.add_typer(pool_app, name="pool")
app.add_typer(volume_app, name="volume")
app.add_typer(snapshot_app, name="snapshot")


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


@app.callback()
def _global(
    home: Path | None = typer.Option(None, "--home", help="state directory (default $VIRTUA_HOME or ~/.local/share/virtua)"),
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
def pool_check(name: str) -> None:
    """Verify reference counts and chunk ownership; exit 1 on any problem."""
    result = call("pool.check", name=name)
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


@volume_app.command("resize")
def volume_resize(
    ref: str,
    size: str = typer.Option(..., "--size"),
    force: bool = typer.Option(False, "--force", help="allow shrinking (data past the end is lost)"),
) -> None:
    """Grow (or, with --force, shrink) a volume."""
    call("volume.resize", ref=ref, size=size, force=force)


@volume_app.command("rm")
def volume_rm(ref: str, recursive: bool = typer.Option(False, "--recursive", "-r", help="also its snapshots and their clones")) -> None:
    """Delete a volume; refused while snapshots or clones depend on it."""
    call("volume.rm", ref=ref, recursive=recursive)


@volume_app.command("reset")
def volume_reset(ref: str) -> None:
    """Throw away a clone's changes: back to the snapshot it was cloned from."""
    call("volume.reset", ref=ref)


@volume_app.command("rebase")
def volume_rebase(ref: str, target: str) -> None:
    """Point a clone at another snapshot (POOL/TEMPLATE@NEWSNAP); its private changes are discarded."""
    call("volume.rebase", ref=ref, target=target)


@volume_app.command("flatten")
def volume_flatten(ref: str) -> None:
    """Copy what a clone shares with its origin, making it independent."""
    call("volume.flatten", ref=ref)


@volume_app.command("import")
def volume_import(
    source: str = typer.Argument(..., help="raw or qcow2 image file, or - for stdin (raw)"),
    ref: str = typer.Argument(..., help="POOL/VOLUME to create"),
) -> None:
    """Create POOL/VOLUME from an image; zero runs stay unallocated."""
    from virtua.cli import data

    result = data.import_image(State.home, State.client(), source, ref)
    render.emit(result, State.json)


@volume_app.command("export")
def volume_export(
    ref: str = typer.Argument(..., help="POOL/VOLUME or POOL/VOLUME@SNAPSHOT"),
    dest: str = typer.Argument(..., help="file, or - for stdout"),
    fmt: str = typer.Option("raw", "--format", "-O", help="raw or qcow2"),
) -> None:
    """Write a volume or snapshot to a sparse raw file, stdout, or qcow2."""
    from virtua.cli import data

    result = data.export_image(State.home, State.client(), ref, dest, fmt)
    if dest != "-":
        render.emit(result, State.json)


@app.command("clone")
def clone(
    source: str = typer.Argument(..., help="POOL/VOLUME@SNAPSHOT, or POOL/VOLUME (takes a snapshot)"),
    new: str = typer.Argument(..., help="POOL/NEW"),
    count: int = typer.Option(1, "--count", "-n", help="make NEW-1 ... NEW-N"),
) -> None:
    """Writable copy-on-write clones, O(1) each."""
    call("clone", source=source, new=new, count=count)


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
def snapshot_rm(ref: str, recursive: bool = typer.Option(False, "--recursive", "-r", help="also its clones")) -> None:
    """Delete a snapshot; refused while clones depend on it."""
    call("snapshot.rm", ref=ref, recursive=recursive)


@snapshot_app.command("rollback")
def snapshot_rollback(ref: str) -> None:
    """Return POOL/VOLUME to POOL/VOLUME@SNAPSHOT (later changes are lost)."""
    call("snapshot.rollback", ref=ref)


# ---------------------------------------------------------------------- entry point

EXTRA_COMMANDS: list[Callable[[typer.Typer], None]] = []


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--json" in args:  # accepted anywhere, for every command
        State.json = True
        args = [a for a in args if a != "--json"]
    from virtua.cli import cluster, daemon  # noqa: F401  (register their commands)
    try:
        app(args=args, prog_name="virtua", standalone_mode=False)
    except VirtuaError as e:
        if State.json:
            import json

            sys.stdout.write(json.dumps(e.to_dict()) + "\n")
        render.err.print(f"virtua: error: {e.message}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code or 0)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise
    finally:
        if State._client is not None:
            State._client.close()
