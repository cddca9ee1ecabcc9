"""Room for metadata on a full file system: a pool never wedges.

Freeing space (removing a volume, trimming, `pool check --repair`) needs a metadata
commit, and a commit needs room for SQLite's write-ahead log. So each pool keeps a
preallocated file, `reserve`, in its directory, and data allocation stops while the file
system has less free space than that file's size (so writes get ENOSPC while there is
still room). Before a metadata transaction on a nearly full file system the reserve is
released; once space is back it is taken again.
"""

from __future__ import annotations

import os
from pathlib import Path

MIN_RESERVE = 2 << 20
MAX_RESERVE = 64 << 20
# never more than this share of the file system (a pool on a 512 KiB tmpfs still works)
MAX_SHARE = 16
# statvfs is a syscall; between two calls, allocations are counted against the last reading
_RECHECK_BELOW = 256 << 20


def reserve_size(capacity: int) -> int:
    return max(MIN_RESERVE, min(MAX_RESERVE, capacity // 256))


class SpaceGuard:
    """The reserve file of one pool directory and the free-space checks around it."""

    def __init__(self, directory: Path, size: int) -> None:
        self.path = Path(directory) / "reserve"
        self.dir = Path(directory)
        st = os.statvfs(self.dir)
        self.size = max(4096, min(size, st.f_blocks * st.f_frsize // MAX_SHARE))
        # room data may not take even while the reserve is held: the metadata of its
        # own allocations, committed at the next flush
        self.slack = self.size // 2
        self.held = False
        self._room = 0  # bytes data may still take since the last statvfs
        try:
            self.held = os.stat(self.path).st_blocks * 512 >= size
        except FileNotFoundError:
            pass
        if not self.held:
            self.take()

    def free_bytes(self) -> int:
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize

    def take(self) -> bool:
        """(Re)make the reserve if the file system has room for it and some to spare
        (3x: released below 1x, so a pool near the edge does not flap)."""
        if self.held:
            return True
        if self.free_bytes() < 3 * self.size:
            return False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError:
            return False
        self.held = True
        self._room = 0
        return True

    def release(self) -> None:
        """Give the reserve's space to the metadata store."""
        if self.held:
            os.truncate(self.path, 0)
            self.held = False
            self._room = 0

    def before_metadata_write(self) -> None:
        """Called before each metadata transaction: on a nearly full file system, release."""
        if self.held:
            if self.free_bytes() < self.size:
                self.release()
        else:
            self.take()

    def data_room(self, nbytes: int) -> bool:
        """May data take nbytes more of the file system? Leaves the reserve's worth free."""
        if nbytes <= self._room:
            self._room -= nbytes
            return True
        keep = self.slack + (0 if self.held else self.size)
        free = self.free_bytes() - keep
        if free < nbytes:
            return False
        # allocate without a syscall until within _RECHECK_BELOW of the limit
        self._room = max(0, free - nbytes - _RECHECK_BELOW)
        return True


def release_if_full(directory: Path) -> None:
    """Before a pool opens on a full file system: SQLite needs room to open its log."""
    path = Path(directory) / "reserve"
    try:
        held = os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return
    st = os.statvfs(directory)
    if held and st.f_bavail * st.f_frsize < held:
        os.truncate(path, 0)
