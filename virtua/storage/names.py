"""Names: POOL, POOL/VOLUME and POOL/VOLUME@SNAPSHOT (as rbd spells them)."""

from __future__ import annotations

import re
from typing import NamedTuple

from virtua.errors import InvalidArgument

# ASCII only and matched in full (fullmatch, never `$`, which lets a trailing newline
# through): names become file names, export names and hostnames.
_PART = r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}"
_PART_RE = re.compile(_PART, re.ASCII)
_REF_RE = re.compile(rf"({_PART})/({_PART})(?:@({_PART}))?", re.ASCII)


class Ref(NamedTuple):
    pool: str
    volume: str
    snapshot: str | None = None

    def __str__(self) -> str:
        s = f"{self.pool}/{self.volume}"
        return f"{s}@{self.snapshot}" if self.snapshot else s


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _PART_RE.fullmatch(name):
        raise InvalidArgument(
            f"bad {what} {name!r}: use 1-64 letters, digits, '_', '.', '+' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_ref(text: str, snapshot: bool | None = None) -> Ref:
    """Parse POOL/VOL or POOL/VOL@SNAP; snapshot=True requires @SNAP, False forbids it."""
    m = _REF_RE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise InvalidArgument(
            f"bad name {text!r}: expected POOL/VOLUME or POOL/VOLUME@SNAPSHOT "
            "(letters, digits, '_', '.', '+', '-')"
        )
    ref = Ref(m.group(1), m.group(2), m.group(3))
    if snapshot is True and ref.snapshot is None:
        raise InvalidArgument(f"{text!r} names a volume; expected POOL/VOLUME@SNAPSHOT")
    if snapshot is False and ref.snapshot is not None:
        raise InvalidArgument(f"{text!r} names a snapshot; expected POOL/VOLUME")
    return ref
