"""How the CLI reaches the operations: in-process, or through a running `virtua serve`."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from virtua.errors import InvalidArgument, Unavailable, from_dict

if TYPE_CHECKING:
    from virtua.storage.imageio import NbdPlace


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
        if self.storage.jobs.running():  # a CLI or serve killed in the middle of one
            from virtua.api import ops  # noqa: F401 - registers the undo kinds
            from virtua.jobs.recovery import Context, recover

            recover(self.storage.jobs, Context(self.storage))

    def call(self, op: str, **args: Any) -> Any:
        from virtua.api import ops

        return ops.run(self.storage, op, args, caller_is_local=True)  # this process, as its user

    def close(self) -> None:
        self.storage.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 on the daemon's unix socket (the standard library's client: httpx and its
    TLS set-up would add a tenth of a second to every command, for a socket without TLS)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("virtua", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s


class RemoteClient(Client):
    """JSON over HTTP: on the daemon's unix socket, or over TCP with TLS and the admin's
    client certificate (--api https://HOST:PORT --cert DIR)."""

    TIMEOUT = 600.0
    nbd_place: NbdPlace | None = None  # where a TCP serve's NBD is, once asked (virtua.cli.data)

    def __init__(
        self, home: Path, api: str | None = None, cert: Path | None = None,
        token_file: Path | None = None, ca: Path | None = None,
    ) -> None:
        self.unix: str | None = None
        self.cert = cert  # the admin credentials over TCP: the API's TLS, and NBD's for data
        if api is None:
            self.unix = str(daemon_socket(home))
            return
        import httpx

        from virtua.pki.credentials import MANAGER, Credentials, peer_checked_context

        if not api.startswith("https://"):
            raise InvalidArgument(f"bad --api {api!r}: expected https://HOST:PORT (the API needs TLS)")
        if token_file is not None:
            import ssl

            if ca is None:
                raise InvalidArgument("--token-file needs --ca FILE (the cluster CA certificate, pki/ca-cert.pem)")
            try:
                token = token_file.read_text().strip()
                verify = peer_checked_context(MANAGER, cafile=str(ca))  # the token goes to the manager only
            except (OSError, ssl.SSLError) as e:
                raise InvalidArgument(f"cannot read --token-file/--ca: {e}") from e
            self.http = httpx.Client(base_url=api.rstrip("/"), timeout=self.TIMEOUT, verify=verify,
                                     headers={"authorization": f"Bearer {token}"})
            return
        if cert is None:
            raise InvalidArgument("--api needs --cert DIR (the admin credentials, $VIRTUA_HOME/pki/admin on "
                                  "the manager) or --token-file with --ca")
        creds = Credentials(cert).check()
        self.http = httpx.Client(base_url=api.rstrip("/"), timeout=self.TIMEOUT, verify=creds.client_context(MANAGER))

    def status(self) -> dict[str, Any]:
        return dict(self._answer("/v1/status", *self._send("GET", "/v1/status", None, None, {})))

    def call(self, op: str, **args: Any) -> Any:
        from virtua.api.route_table import request_for

        req = request_for(op, args)  # the daemon's route of the operation (virtua.api.routes)
        content = None if req.body is None else json.dumps(req.body).encode()
        headers = {} if content is None else {"content-type": "application/json"}
        return self._answer(op, *self._send(req.method, req.path, req.query, content, headers))

    @staticmethod
    def _answer(what: str, status: int, data: bytes) -> Any:
        try:
            body = json.loads(data)
        except ValueError as e:
            raise Unavailable(f"virtua serve answered {what} with HTTP {status} and no JSON") from e
        if status >= 400:
            raise from_dict(body)
        return body

    def _send(self, method: str, path: str, query: dict[str, str] | None, content: bytes | None,
              headers: dict[str, str]) -> tuple[int, bytes]:
        if self.unix is None:
            import httpx

            try:
                r = self.http.request(method, path, params=query, content=content, headers=headers)
            except httpx.HTTPError as e:
                raise Unavailable(f"virtua serve is not answering: {e}") from e
            return r.status_code, r.content
        url = f"{path}?{urlencode(query)}" if query else path
        # a connection per call: a kept-alive one the daemon has since closed would fail
        # the next request, and a unix socket's connect costs microseconds
        conn = _UnixHTTPConnection(self.unix, self.TIMEOUT)
        try:
            conn.request(method, url, body=content, headers=headers)
            answer = conn.getresponse()
            return answer.status, answer.read()
        except (OSError, http.client.HTTPException) as e:
            raise Unavailable(f"virtua serve is not answering: {e}") from e
        finally:
            conn.close()

    def close(self) -> None:
        if self.unix is None:
            self.http.close()


def connect(
    home: Path, api: str | None = None, cert: Path | None = None, token_file: Path | None = None,
    ca: Path | None = None,
) -> Client:
    if api is not None:
        return RemoteClient(home, api, cert, token_file, ca)
    if daemon_alive(home):
        return RemoteClient(home)
    return LocalClient(home)
