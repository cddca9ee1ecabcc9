"""fallocate(2) hole punching and sync_file_range(2), which Python's os module does not expose."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset+length) so it reads as zeros. False if unsupported."""
    if length <= 0:
        return True
    rc = _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (95, 38):  # EOPNOTSUPP, ENOSYS
            return False
        raise OSError(err, os.strerror(err))
    return True


_SYNC_FILE_RANGE_WRITE = 0x2
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int


def start_writeback(fd: int) -> None:
    """Start writing fd's dirty pages back, without waiting for them (the later
    fdatasync then has less to do). Best effort: errors are ignored."""
    _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
