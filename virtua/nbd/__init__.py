"""NBD (Network Block Device) server for virtua exports."""

from virtua.nbd.exports import DirectoryProvider, ExportProvider
from virtua.nbd.server import NBDServer, TLSMode, nbd_errno
from virtua.nbd.tls import TLSConfig

__all__ = ["DirectoryProvider", "ExportProvider", "NBDServer", "TLSConfig", "TLSMode", "nbd_errno"]
