"""Where virtua keeps its state: $VIRTUA_HOME, else the XDG data directory."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    env = os.environ.get("VIRTUA_HOME")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "virtua"


def admin_nbd_socket(home: Path) -> Path:
    """The administrator's NBD socket of a running `virtua serve` (the CLI's import and
    export): in a 0700 directory, every volume an export, no TLS."""
    return home / "private" / "nbd.sock"
