"""The pools' volumes and snapshots as NBD exports: the provider `virtua serve` gives its
NBD servers (the network one, with the allow-lists and the cluster's per-host policy, and
the administrator's private socket), and the CLI its in-process one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from virtua.storage.device import BlockDevice
from virtua.storage.service import Storage


class AdminExports:
    """The same exports (and devices) for the local administrator: only the owner of the
    private directory can reach this socket, so neither TLS nor the allow-list applies."""

    def __init__(self, exports: StorageExports) -> None:
        self.exports = exports

    def open_export(self, name: str) -> BlockDevice | None:
        return self.exports.open_export(name)

    def list_exports(self) -> list[tuple[str, str]]:
        return self.exports.list_exports()

    def allowed(self, name: str, identity: str | None) -> bool:
        return True


class StorageExports:
    """The pools' volumes and snapshots as NBD exports, with per-export allow-lists."""

    def __init__(
        self, storage: Storage, allow: dict[str, set[str]],
        host_access: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.storage = storage
        self.allow = allow
        # (export, TLS identity) -> may it open it: the manager's per-host allow-list
        self.host_access = host_access
        # (export, TLS identity) -> who that is ("VM web/web-1 on host h1"), for in-use errors
        self.holder_label: Callable[[str, str | None], str | None] | None = None
        self._devices: dict[str, BlockDevice] = {}

    def open_export(self, name: str) -> BlockDevice | None:
        dev = self._devices.get(name)
        if dev is not None and _alive(dev) and _still_named(dev, name):
            return dev
        dev = self.storage.open_export(name)
        if dev is not None:
            self._devices[name] = dev  # one device per export: multi-conn shares it
        else:
            self._devices.pop(name, None)
        return dev

    def list_exports(self) -> list[tuple[str, str]]:
        return self.storage.list_exports()

    def allowed(self, name: str, identity: str | None) -> bool:
        rules = [ids for pattern, ids in self.allow.items() if fnmatch.fnmatchcase(name, pattern)]
        if rules:  # the administrator's explicit --allow rules come first
            return identity is not None and any(identity in ids for ids in rules)
        if identity is None or self.host_access is None:
            # plaintext got this far only where the listener allows it (unix socket,
            # loopback); without the cluster policy every identity may
            return True
        return self.host_access(name, identity)


def _alive(dev: BlockDevice) -> bool:
    vol = getattr(dev, "vol", None)
    if vol is not None:
        return not vol.deleted
    snap = getattr(dev, "snap", None)
    pool = getattr(dev, "pool", None)
    return snap is None or pool is None or snap.id in pool.snapshots


def _still_named(dev: BlockDevice, name: str) -> bool:
    """A renamed (or trashed) volume or snapshot no longer answers to its old name."""
    pool = getattr(dev, "pool", None)
    vol = getattr(dev, "vol", None)
    snap = getattr(dev, "snap", None)
    if pool is None:
        return True
    if vol is not None:
        return bool(name == f"{pool.name}/{vol.name}")
    if snap is not None:
        return bool(name == pool.snapshot_ref(snap))
    return True
