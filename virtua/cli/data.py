"""Image import/export for the CLI, with a progress bar on a terminal.

In-process when the CLI holds the pools; through the daemon's NBD socket (qemu-img)
when `virtua serve` holds them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from virtua.cli.client import Client, LocalClient
from virtua.errors import InvalidArgument
from virtua.storage import imageio
from virtua.storage.names import parse_ref
from virtua.storage.pool import SECTOR


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[Callable[[int], None]]:
    import sys

    if not sys.stderr.isatty():
        yield lambda done: None
        return
    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


def nbd_uri(home: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={home / 'nbd.sock'}"


def import_image(home: Path, client: Client, source: str, ref: str) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    with imageio.raw_source(source) as raw:
        size = os.path.getsize(raw)
        if size == 0:
            raise InvalidArgument(f"{source} is empty")
        vsize = (size + SECTOR - 1) // SECTOR * SECTOR
        client.call("volume.create", ref=ref, size=vsize)
        try:
            if isinstance(client, LocalClient):
                dev = client.storage.open_device(ref)
                with progress_bar(f"import {ref}", size) as progress:
                    written = imageio.import_into(raw, dev, progress)
            else:
                _qemu_img(["convert", "-n", "-f", "raw", "-O", "raw", raw, nbd_uri(home, str(r))])
                written = -1
        except BaseException:
            client.call("volume.rm", ref=ref)
            raise
    info: dict[str, Any] = client.call("volume.info", ref=ref)
    if written >= 0:
        info["written"] = written
    return info


def export_image(home: Path, client: Client, ref: str, dest: str, fmt: str) -> dict[str, Any]:
    parse_ref(ref)
    if isinstance(client, LocalClient):
        dev = client.storage.open_device(ref)
        with progress_bar(f"export {ref}", dev.size) as progress:
            imageio.export_from(dev, dest, fmt, progress)
        size = dev.size
    else:
        if dest == "-":
            raise InvalidArgument("export to stdout needs the pool in-process; stop virtua serve or give a file")
        _qemu_img(["convert", "-f", "raw", "-O", fmt, nbd_uri(home, ref), dest])
        size = os.path.getsize(dest)
    return {"name": ref, "file": dest, "format": fmt, "size": size}


def _qemu_img(args: list[str]) -> None:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise InvalidArgument(f"qemu-img {args[0]} failed: {r.stderr.strip()}")
