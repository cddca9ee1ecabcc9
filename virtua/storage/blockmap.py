"""The block map: virtual chunk number -> physical chunk, with O(1) copy-on-write forks.

A map is a dict of fixed-size segments (arrays of SEG = 16 entries). fork() shares the whole
dict; the first write after a fork copies the dict of segment references, and the first
write into a segment copies that one segment. So a clone costs O(1), reads cost two
lookups whatever the snapshot depth, and memory grows with what is written, never with
the virtual size.

Entry values: HOLE_V (0) nothing mapped, ZERO_V (-1) explicitly zeroed (masks data of an
ancestor), > 0 a physical chunk number.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

SEG_SHIFT = 4  # 16 entries: even scattered writes cost < 4 MiB of map per GiB
SEG = 1 << SEG_SHIFT
SEG_MASK = SEG - 1
HOLE_V = 0
ZERO_V = -1
_EMPTY_SEG = array("i", bytes(4 * SEG))


class BlockMap:
    __slots__ = ("segs", "owned", "dict_shared")

    def __init__(self) -> None:
        self.segs: dict[int, array[int]] = {}
        self.owned: set[int] = set()  # segment numbers this map may write in place
        self.dict_shared = False

    def fork(self) -> BlockMap:
        """A new map with the same content; both copy on write from now on."""
        child = BlockMap()
        child.segs = self.segs
        child.dict_shared = True
        self.dict_shared = True
        self.owned = set()
        return child

    def get(self, chunk: int) -> int:
        seg = self.segs.get(chunk >> SEG_SHIFT)
        return HOLE_V if seg is None else seg[chunk & SEG_MASK]

    def set(self, chunk: int, value: int) -> None:
        si = chunk >> SEG_SHIFT
        if self.dict_shared:
            self.segs = dict(self.segs)
            self.dict_shared = False
        seg = self.segs.get(si)
        if seg is None:
            if value == HOLE_V:
                return
            seg = array("i", _EMPTY_SEG)
            self.segs[si] = seg
            self.owned.add(si)
        elif si not in self.owned:
            seg = array("i", seg)
            self.segs[si] = seg
            self.owned.add(si)
        seg[chunk & SEG_MASK] = value

    def items(self) -> Iterator[tuple[int, int]]:
        """(chunk, value) for every entry that is not a hole, in chunk order."""
        for si in sorted(self.segs):
            base = si << SEG_SHIFT
            for i, v in enumerate(self.segs[si]):
                if v != HOLE_V:
                    yield base + i, v

    def runs(self, first: int, last: int) -> Iterator[tuple[int, int, int]]:
        """(start chunk, count, value) runs covering chunks first..last-1; holes in bulk."""
        return self._runs(first, last, 0)

    def linear_runs(self, first: int, last: int) -> Iterator[tuple[int, int, int]]:
        """Like runs(), but a run of value v > 0 maps its chunks to v, v+1, v+2, ...: data
        laid out in one piece (an import, a sequential write) comes out as one run per
        16-entry segment at most, looked at a segment at a time."""
        return self._runs(first, last, 1)

    def _runs(self, first: int, last: int, step: int) -> Iterator[tuple[int, int, int]]:
        c = first
        segs = self.segs
        while c < last:
            si = c >> SEG_SHIFT
            seg_end = min((si + 1) << SEG_SHIFT, last)
            seg = segs.get(si)
            if seg is None:
                yield c, seg_end - c, HOLE_V
                c = seg_end
                continue
            v0 = seg[c & SEG_MASK]
            if step and v0 > 0 and seg_end - c == SEG and seg == array("i", range(v0, v0 + SEG)):
                yield c, SEG, v0
                c = seg_end
                continue
            while c < seg_end:
                v = seg[c & SEG_MASK]
                s = c
                c += 1
                k = step if v > 0 else 0
                while c < seg_end and seg[c & SEG_MASK] == v + k * (c - s):
                    c += 1
                yield s, c - s, v

    def memory_bytes(self) -> int:
        """Approximate bytes held privately by this map (segments it owns + the dict)."""
        import sys

        owned = sum(sys.getsizeof(self.segs[s]) for s in self.owned if s in self.segs)
        return owned + (0 if self.dict_shared else sys.getsizeof(self.segs))
