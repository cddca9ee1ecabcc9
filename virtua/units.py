"""Sizes as people write them: 512, 4K, 1.5G, 2T (powers of 1024, like qemu-img)."""

from __future__ import annotations

import re

from virtua.errors import InvalidArgument

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPB]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgument(f"bad size {text!r}: expected a number with an optional K/M/G/T suffix")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value != int(value):
        raise InvalidArgument(f"bad size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            v = n / factor
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


def human_size(n: int) -> str:
    """For messages people read: '1 PiB', '400 GiB', '1.5 MiB', '512 bytes'."""
    for unit, factor in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30),
                         ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= factor:
            v = n / factor
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} bytes"
