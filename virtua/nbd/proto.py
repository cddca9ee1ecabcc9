"""NBD wire constants and precompiled structs (fixed newstyle, structured replies).

Names follow doc/proto.md of the NetworkBlockDevice/nbd project.
"""

from __future__ import annotations

import errno
import struct

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) / client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

# NBD_OPT_INFO / NBD_OPT_GO information types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# Command flags.
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply flags and types.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# base:allocation flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# Protocol error values (the only ones allowed on the wire).
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# Map a host errno to the NBD error set.
ERRNO_TO_NBD: dict[int, int] = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1

MAX_PAYLOAD = 32 * 1024 * 1024
MAX_STRING = 4096
MAX_OPTION_LEN = 64 * 1024  # options longer than this are a DoS: hard disconnect

# Structs (network byte order).
S_SERVER_HELLO = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
S_U16 = struct.Struct(">H")
S_U32 = struct.Struct(">I")
S_U64 = struct.Struct(">Q")
S_OPT_HDR = struct.Struct(">QII")  # IHAVEOPT, option, length
S_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
S_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
S_INFO_EXPORT = struct.Struct(">HQH")  # INFO_EXPORT, size, flags
S_INFO_BLOCK_SIZE = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, min, preferred, max
S_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
REQUEST_SIZE = S_REQUEST.size  # 28
S_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
SIMPLE_REPLY_SIZE = S_SIMPLE_REPLY.size  # 16
S_STRUCT_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
STRUCT_REPLY_SIZE = S_STRUCT_REPLY.size  # 20
S_STRUCT_DATA_HDR = struct.Struct(">IHHQIQ")  # chunk header + offset
STRUCT_DATA_HDR_SIZE = S_STRUCT_DATA_HDR.size  # 28
S_STRUCT_HOLE = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
S_STRUCT_ERROR = struct.Struct(">IHHQIIH")  # chunk header + error + message length
S_BS_DESC = struct.Struct(">II")  # extent length, flags
