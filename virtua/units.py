"""Sizes as people write them: 512, 4K, 1.5G, 2T (powers of 1024, like qemu-img)."""

from __future__ import annotations

import re
from fractions import Fraction

from virtua.errors import InvalidArgument

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# ASCII digits only, matched in full: "12\n" or Arabic-Indic digits are not sizes
_SIZE_RE = re.compile(r" *(\d+(?:\.\d+)?) *([KMGTPB]?)(?:I?B)? *", re.IGNORECASE | re.ASCII)
SECTOR = 512  # volume sizes are whole sectors (what NBD clients and qemu-img expect)
# The largest size an NBD export, a file offset (off_t) or qemu-img can hold.
MAX_SIZE = (1 << 63) - 1


def parse_size(text: str | int) -> int:
    # bool is an int subclass: `"size": true` must not mean 1 byte
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise InvalidArgument(f"bad size {text!r}: expected a number of bytes or a string like 4G")
    if isinstance(text, int):
        value = Fraction(text)
    else:
        m = _SIZE_RE.fullmatch(text)
        if not m:
            raise InvalidArgument(f"bad size {text!r}: expected a number with an optional K/M/G/T suffix")
        value = Fraction(m.group(1)) * _SUFFIX[m.group(2).upper()]  # exact: no float rounding
    if value < 0:
        raise InvalidArgument(f"bad size {text!r}: must not be negative")
    if value.denominator != 1:
        raise InvalidArgument(f"bad size {text!r}: not a whole number of bytes")
    if value > MAX_SIZE:
        raise InvalidArgument(f"bad size {text!r}: larger than the maximum of 8E - 1 bytes")
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
