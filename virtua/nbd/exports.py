"""What the NBD server serves: the ExportProvider protocol and a directory-backed provider."""

from __future__ import annotations

import os
import stat
import threading
from typing import Protocol, runtime_checkable

from virtua.storage.device import BlockDevice, FileDevice


@runtime_checkable
class ExportProvider(Protocol):
    """The server's view of the exports.

    open_export() must return the SAME device object for every connection to one
    name in a process: the server advertises NBD_FLAG_CAN_MULTI_CONN on that basis
    (a flush on any connection then covers writes acknowledged on all of them).
    """

    def open_export(self, name: str) -> BlockDevice | None:
        """The device behind an export, or None if there is no such export."""
        ...

    def list_exports(self) -> list[tuple[str, str]]:
        """(name, description) for NBD_OPT_LIST."""
        ...

    def allowed(self, name: str, identity: str | None) -> bool:
        """May a client with this TLS identity (PSK username or cert CN; None
        without TLS) use this export?"""
        ...


class DirectoryProvider:
    """Every regular file directly inside a directory is an export of the same name.

    A name containing '@' (a snapshot, by convention) is exported read-only.
    ``acl`` optionally maps an export name to the TLS identities allowed to use it;
    exports not in it are open to everybody.
    """

    def __init__(
        self,
        directory: str,
        *,
        block_size: int = 4096,
        acl: dict[str, set[str]] | None = None,
        descriptions: dict[str, str] | None = None,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.block_size = block_size
        self.acl = acl or {}
        self.descriptions = descriptions or {}
        self._devices: dict[str, FileDevice] = {}
        self._lock = threading.Lock()

    def _path(self, name: str) -> str | None:
        if not name or "/" in name or "\0" in name or name.startswith("."):
            return None
        path = os.path.join(self.directory, name)
        try:
            st = os.stat(path)
        except OSError:
            return None
        return path if stat.S_ISREG(st.st_mode) else None

    def open_export(self, name: str) -> BlockDevice | None:
        with self._lock:
            dev = self._devices.get(name)
            if dev is not None:
                return dev
            path = self._path(name)
            if path is None:
                return None
            dev = FileDevice(path, readonly="@" in name, block_size=self.block_size)
            self._devices[name] = dev
            return dev

    def list_exports(self) -> list[tuple[str, str]]:
        out = []
        for name in sorted(os.listdir(self.directory)):
            if self._path(name) is not None:
                out.append((name, self.descriptions.get(name, f"file {name}")))
        return out

    def allowed(self, name: str, identity: str | None) -> bool:
        allow = self.acl.get(name)
        return allow is None or (identity is not None and identity in allow)

    def close(self) -> None:
        with self._lock:
            for dev in self._devices.values():
                dev.close()
            self._devices.clear()
