"""How the CLI reaches the operations: in-process, or through a running `virtua serve`."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from virtua.errors import Unavailable, from_dict


def daemon_socket(home: Path) -> Path:
    return home / "virtua.sock"


def daemon_alive(home: Path) -> bool:
    path = daemon_socket(home)
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Client:
    def call(self, op: str, **args: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalClient(Client):
    def __init__(self, home: Path) -> None:
        from virtua.storage.service import Storage

        self.storage = Storage(home)

    def call(self, op: str, **args: Any) -> Any:
        from virtua.api import ops

        return ops.run(self.storage, op, args)

    def close(self) -> None:
        self.storage.close()


class RemoteClient(Client):
    """JSON over HTTP on the daemon's unix socket."""

    def __init__(self, home: Path) -> None:
        import httpx

        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(daemon_socket(home))),
            base_url="http://virtua",
            timeout=600,
        )

    def call(self, op: str, **args: Any) -> Any:
        import httpx

        try:
            r = self.http.post(f"/v1/ops/{op}", content=json.dumps(args))
        except httpx.HTTPError as e:
            raise Unavailable(f"virtua serve is not answering: {e}") from e
        body = r.json()
        if r.status_code >= 400:
            raise from_dict(body)
        return body

    def close(self) -> None:
        self.http.close()


def connect(home: Path) -> Client:
    if daemon_alive(home):
        return RemoteClient(home)
    return LocalClient(home)
