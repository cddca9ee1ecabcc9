"""Human output: rich tables; sizes in K/M/G; --json prints the raw result instead."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from virtua.units import format_size

if TYPE_CHECKING:
    from rich.console import Console

    out: Console  # stdout and stderr as rich consoles, made on first use (module __getattr__)
    err: Console


def __getattr__(name: str) -> Any:
    if name in ("out", "err"):
        return _console(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _console(which: str) -> Console:
    """A rich console, made and kept on first use: importing rich costs every command tens of
    milliseconds, and a command whose output goes to a pipe or a file never needs it."""
    console = globals().get(which)
    if console is None:
        from rich.console import Console

        console = globals()[which] = Console(stderr=which == "err")
    return console


_RICH_ENV = ("FORCE_TERMINAL", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR")


def _stdout_is_terminal() -> bool:
    """What rich would say, without importing it for output to a pipe or a file."""
    if "out" in globals() or sys.stdout.isatty() or any(os.environ.get(v) for v in _RICH_ENV):
        return _console("out").is_terminal
    return False

SIZE_KEYS = {
    "size", "capacity", "used", "free", "provisioned", "allocated", "unique", "shared",
    "chunk_size", "copied", "written", "memory", "disk_unique", "disk_shared",
    "bytes_read", "bytes_written", "file_size", "zeroed", "filesystem_size", "data",
}


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09, 0x0A)}
# bidirectional overrides and isolates reorder what the terminal shows (Trojan Source)
_CONTROL.update({c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]})


_CONTROL_LINE = {**_CONTROL, 0x0A: "\\n", 0x09: "\\t"}


def printable(text: str, one_line: bool = False) -> str:
    """Control characters escaped (\\x1b...): what a host, a guest or a server says about
    itself must not drive the administrator's terminal; one_line escapes newlines too
    (a log line a peer's text cannot split or forge)."""
    return text.translate(_CONTROL_LINE if one_line else _CONTROL)


class OneLineFormatter(logging.Formatter):
    """Log messages on one line each, control characters escaped; tracebacks as usual."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message, one_line=True)
        return super().formatMessage(record)


def fmt(key: str, value: Any) -> str:
    return printable(_fmt(key, value))


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in SIZE_KEYS and isinstance(value, int):
        return format_size(value)
    if key in ("created", "registered", "last_seen", "since", "deleted", "expires", "updated", "ended", "lease_until") and isinstance(value, float):
        import datetime

        return datetime.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _plain_table(cols: list[str], rows: list[list[str]]) -> str:
    """Aligned columns without box characters or a width limit: for pipes and files."""
    headers = [c.upper().replace("_", " ") for c in cols]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    for cells in [headers, *rows]:
        parts = [
            cell.rjust(w) if cols[i] in SIZE_KEYS else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _fitting_columns(cols: list[str], rows: list[list[str]], width: int) -> list[int]:
    """Indexes of the columns to show on a terminal this wide: never cut a column; drop the
    rightmost (least important) ones that do not fit, but always keep the first (the name)."""
    keep: list[int] = []
    used = 0
    for i, c in enumerate(cols):
        w = max(len(c), *(len(r[i]) for r in rows)) + 3
        if keep and used + w > width:
            break
        keep.append(i)
        used += w
    return keep


def emit(result: Any, as_json: bool, columns: Sequence[str] | None = None, title: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return
    if isinstance(result, list):
        if not result:
            sys.stdout.write("(none)\n")
            return
        cols = list(columns or result[0].keys())
        rows = [[fmt(c, row.get(c)) for c in cols] for row in result]
        if not _stdout_is_terminal():
            sys.stdout.write(_plain_table(cols, rows) + "\n")
        else:
            from rich.table import Table
            from rich.text import Text

            out = _console("out")
            keep = _fitting_columns(cols, rows, out.width)
            table = Table(title=title, show_edge=False, header_style="bold")
            for i in keep:
                c = cols[i]
                table.add_column(c.upper().replace("_", " "), justify="right" if c in SIZE_KEYS else "left",
                                 no_wrap=True)
            for r in rows:
                table.add_row(*(Text(r[i]) for i in keep))  # Text: no markup from the data
            out.print(table)
            if len(keep) < len(cols):
                dropped = ", ".join(cols[i] for i in range(len(cols)) if i not in keep)
                _console("err").print(f"({dropped} left out to fit {out.width} columns; --json has everything)",
                                      highlight=False)
        for row in result:
            if row.get("warning"):
                warn(str(row["warning"]))
        return
    if isinstance(result, dict):
        pairs = [(k.replace("_", " "), fmt(k, v)) for k, v in result.items() if k != "warning"]
        if not _stdout_is_terminal():
            w = max((len(k) for k, _ in pairs), default=0)
            sys.stdout.write("".join(f"{k.ljust(w)}  {v}\n" for k, v in pairs))
        else:
            from rich.table import Table
            from rich.text import Text

            table = Table(title=title, show_header=False, show_edge=False, box=None)
            table.add_column(style="bold", no_wrap=True)
            table.add_column(overflow="fold")
            for k, v in pairs:
                table.add_row(Text(k), Text(v))
            _console("out").print(table)
        if result.get("warning"):
            warn(str(result["warning"]))
        return
    _console("out").print(result)


def warn(message: str) -> None:
    from rich.text import Text

    _console("err").print("[yellow]warning:[/]", Text(printable(message)))
