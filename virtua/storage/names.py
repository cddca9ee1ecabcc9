"""Names: POOL, POOL/VOLUME and POOL/VOLUME@SNAPSHOT (as rbd spells them)."""

from __future__ import annotations

import re
from typing import NamedTuple

from virtua.errors import InvalidArgument

_PART = r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}"
_PART_RE = re.compile(rf"^{_PART}$")
_REF_RE = re.compile(rf"^({_PART})/({_PART})(?:@({_PART}))?$")


class Ref(NamedTuple):
    pool: str
    volume: str
    snapshot: str | None = None

    def __str__(self) -> str:
        s = f"{self.pool}/{self.volume}"
        return f"{s}@{self.snapshot}" if self.snapshot else s


def check_name(name: str, what: str = "name") -> str:
    if not _PART_RE.match(name):
        raise InvalidArgument(
            f"bad {what} {name!r}: use 1-64 letters, digits, '_', '.', '+' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_ref(text: str, snapshot: bool | None = None) -> Ref:
    """Parse POOL/VOL or POOL/VOL@SNAP; snapshot=True requires @SNAP, False forbids it."""
    m = _REF_RE.match(text)
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
