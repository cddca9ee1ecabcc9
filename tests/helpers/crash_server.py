"""The real NBD server over the real pools of one home, with the admin operations on a
unix socket, for crash tests that kill -9 it many times: `python -m tests.helpers.crash_server HOME`.

Why not `virtua serve`: it imports FastAPI, uvicorn and the cluster manager, which takes
1-6 s per start on a loaded 2-core machine; crash tests restart the server at every kill
point. This runs the same NBDServer, the same Storage and the same operations table
(virtua.api.ops) on one event loop, as the daemon does; only the HTTP shell is missing.
Each line on HOME/ops.sock is a JSON request {"op": NAME, "args": {...}}; the answer is
one JSON line, the result or {"error": CATEGORY, "message": ...}.

Prints ``CRASH_READY port=<nbd port>`` once listening. `CrashServer` drives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


async def _serve(home: Path) -> None:
    from virtua.api import ops
    from virtua.errors import VirtuaError
    from virtua.nbd.server import NBDServer
    from virtua.storage.service import Storage

    storage = Storage(home)
    for name in storage.pool_paths():  # open every pool now, as `virtua serve` does
        storage.pool(name)
    nbd = NBDServer(storage)  # type: ignore[arg-type]
    await nbd.start(host="127.0.0.1", port=0)

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            req = json.loads(line)
            try:
                result = ops.run(storage, req["op"], req.get("args", {}))
                if asyncio.iscoroutine(result):
                    result = await result
                answer: Any = {"result": result}
            except VirtuaError as e:
                answer = e.to_dict()
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    sock_path = home / "ops.sock"
    sock_path.unlink(missing_ok=True)
    # keep the server referenced: a collected asyncio Server closes its listening socket
    control_server = await asyncio.start_unix_server(control, str(sock_path))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"CRASH_READY port={nbd.port}", flush=True)
    await stop.wait()
    control_server.close()
    await nbd.close()
    storage.close()


class OpError(Exception):
    def __init__(self, category: str, message: str) -> None:
        super().__init__(f"{category}: {message}")
        self.category = category
        self.message = message


class CrashServer:
    """Start, call, kill -9 and restart the helper server over one home."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self._ops: socket.socket | None = None
        self._ops_file: Any = None

    def start(self) -> CrashServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.crash_server", str(self.home)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **self.env} if self.env else None,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # '' if it died
        if not line.startswith("CRASH_READY"):
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.proc.kill()
            raise RuntimeError(f"crash server did not start: {line!r} {err}")
        self.port = int(line.split("port=")[1])
        return self

    def call(self, op: str, **args: Any) -> Any:
        if self._ops is None:
            self._ops = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._ops.settimeout(120)
            self._ops.connect(str(self.home / "ops.sock"))
            self._ops_file = self._ops.makefile("rwb")
        self._ops_file.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
        self._ops_file.flush()
        line = self._ops_file.readline()
        if not line:
            raise ConnectionError("crash server closed the ops connection")
        answer = json.loads(line)
        if "error" in answer:
            raise OpError(answer["error"], answer["message"])
        return answer["result"]

    def _drop_ops(self) -> None:
        if self._ops is not None:
            with contextlib.suppress(OSError):  # a half-sent request to a killed server
                if self._ops_file is not None:  # None: the connect itself failed
                    self._ops_file.close()
            self._ops.close()
            self._ops = self._ops_file = None

    def kill(self) -> None:
        """SIGKILL: no flush, no close; the pool is what the disk holds."""
        self._drop_ops()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.communicate(timeout=30)
        self.proc = None

    def stop(self) -> None:
        self._drop_ops()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.communicate(timeout=30)
        self.proc = None

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def main() -> None:
    home = Path(sys.argv[1])
    try:
        import uvloop

        uvloop.run(_serve(home))
    except ImportError:
        asyncio.run(_serve(home))
    os._exit(0)


if __name__ == "__main__":
    main()


class ServeCrashServer(CrashServer):
    """The same driver for the whole daemon: `virtua serve` (HTTP API, manager, cluster
    CA, edge limits and all) is what gets killed; operations go through its API socket."""

    def start(self) -> CrashServer:
        from tests.cli_support import free_port

        port, api_port = free_port(), free_port()
        env = {**os.environ, "VIRTUA_HOME": str(self.home), **(self.env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"127.0.0.1:{port}",
             "--api-listen", f"127.0.0.1:{api_port}"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("VIRTUA_READY"):
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.proc.kill()
            raise RuntimeError(f"virtua serve did not start: {line!r} {err[-2000:]}")
        self.port = port
        return self

    def call(self, op: str, **args: Any) -> Any:
        import httpx

        if self._http is None:
            self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.home / "virtua.sock")),
                                      base_url="http://virtua", timeout=120)
        from virtua.api.routes import request_for

        req = request_for(op, args)
        try:
            r = self._http.request(req.method, req.path, params=req.query,
                                   content=None if req.body is None else json.dumps(req.body))
        except httpx.TransportError as e:  # killed under the request: what the workload expects
            raise ConnectionError(f"virtua serve dropped {op}: {e}") from e
        answer = r.json()
        if r.status_code >= 400:
            raise OpError(answer.get("error", "VirtuaError"), answer.get("message", r.text))
        return answer

    _http: Any = None

    def _drop_ops(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
