"""Human output: rich tables; sizes in K/M/G; --json prints the raw result instead."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from virtua.units import format_size

out = Console()
err = Console(stderr=True)

SIZE_KEYS = {
    "size", "capacity", "used", "free", "provisioned", "allocated", "unique", "shared",
    "chunk_size", "copied", "written", "memory", "disk_unique", "disk_shared",
    "bytes_read", "bytes_written", "file_size",
}


def fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in SIZE_KEYS and isinstance(value, int):
        return format_size(value)
    if key in ("created", "registered", "last_seen", "since") and isinstance(value, float):
        import datetime

        return datetime.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def emit(result: Any, as_json: bool, columns: Sequence[str] | None = None, title: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return
    if isinstance(result, list):
        if not result:
            out.print("(none)")
            return
        cols = list(columns or result[0].keys())
        table = Table(title=title, show_edge=False, header_style="bold")
        for c in cols:
            table.add_column(c.upper().replace("_", " "), justify="right" if c in SIZE_KEYS else "left")
        for row in result:
            table.add_row(*(fmt(c, row.get(c)) for c in cols))
        out.print(table)
        for row in result:
            if row.get("warning"):
                err.print(f"[yellow]warning:[/] {row['warning']}")
        return
    if isinstance(result, dict):
        table = Table(title=title, show_header=False, show_edge=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        for k, v in result.items():
            if k == "warning":
                continue
            table.add_row(k.replace("_", " "), fmt(k, v))
        out.print(table)
        if result.get("warning"):
            err.print(f"[yellow]warning:[/] {result['warning']}")
        return
    out.print(result)
