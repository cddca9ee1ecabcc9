"""Who has an export open right now: the `rbd status` of virtua.

The NBD server adds a Holder when a client enters transmission on an export and removes
it on disconnect; it counts the bytes each one moves. Destructive admin operations ask
here first, so they refuse (naming the client) while a volume is in use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Holder:
    export: str  # POOL/VOLUME or POOL/VOLUME@SNAPSHOT
    client: str  # peer address, or "unix socket"
    identity: str | None = None  # TLS identity (PSK user or certificate CN)
    readonly: bool = False
    since: float = field(default_factory=time.time)
    bytes_read: int = 0
    bytes_written: int = 0
    label: str | None = None
    # closes this connection (the NBD server's), with a reason for its log
    disconnect: Callable[[str], None] | None = field(default=None, repr=False)

    def describe(self) -> str:
        """"NBD client 10.0.0.11:5544 (TLS h1) on p/d since 12:00:00", or with a label
        (who the client is in the cluster's words) "VM web/web-1 on host h1 (NBD client
        10.0.0.11:5544, TLS h1) on p/d since 12:00:00"."""
        who = f"NBD client {self.client}"
        if self.label:
            who = f"{self.label} ({who}{f', TLS {self.identity}' if self.identity else ''})"
        elif self.identity:
            who += f" (TLS {self.identity})"
        since = time.strftime("%H:%M:%S", time.localtime(self.since))
        return f"{who} on {self.export} since {since}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "export": self.export,
            "client": self.client,
            "tls_identity": self.identity,
            "readonly": self.readonly,
            "since": self.since,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "user": self.label,
        }


class Holders:
    """The open connections of one process, by export name."""

    def __init__(self) -> None:
        self._by_export: dict[str, list[Holder]] = {}

    def add(self, holder: Holder) -> None:
        self._by_export.setdefault(holder.export, []).append(holder)

    def remove(self, holder: Holder) -> None:
        held = self._by_export.get(holder.export)
        if held and holder in held:
            held.remove(holder)
            if not held:
                del self._by_export[holder.export]

    def all(self) -> list[Holder]:
        return [h for held in self._by_export.values() for h in held]

    def of(self, exports: Iterable[str]) -> list[Holder]:
        return [h for e in exports for h in self._by_export.get(e, ())]

    def of_volume(self, volume_ref: str) -> list[Holder]:
        """Holders of POOL/VOLUME and of its snapshots' exports."""
        return [
            h for e, held in sorted(self._by_export.items())
            if e == volume_ref or e.startswith(volume_ref + "@") for h in held
        ]
