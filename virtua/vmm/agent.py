"""Host side of the guest agent: run shell scripts in a guest over its second serial port.

The rootfs starts ``/sbin/virtua-agent`` on ``/dev/ttyS1`` (raw, no echo).  QEMU exposes
that port as a unix socket (``VMSpec.agent_socket``).  Protocol, one line each way::

    host  -> guest   "<id> <base64(script)>\\n"
    guest -> host    "VXO <id> <rc> <base64(stdout+stderr)>\\n"

Scripts run one at a time under ``sh`` with stdin from /dev/null; a background job
(``cmd &``) does not hold the reply back because output goes to a file, not a pipe.
Lines that do not start with ``VXO <id>`` are ignored, so echo noise from before the agent
switched the port to raw mode is harmless; :meth:`GuestAgent.wait_ready` pings until the
agent answers.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

from virtua.errors import Unavailable, VirtuaError


@dataclass(frozen=True)
class AgentResult:
    rc: int
    output: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class GuestCommandError(VirtuaError):
    def __init__(self, script: str, result: AgentResult) -> None:
        super().__init__(f"guest command failed rc={result.rc}: {script!r}: {result.output[-500:]}")
        self.result = result


class GuestAgent:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = Path(socket_path)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._ready = False

    async def _connect(self, deadline: float) -> None:
        if self._writer is not None and not self._writer.is_closing():
            return
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self.socket_path), limit=16 * 1024 * 1024
                )
                self._ready = False
                return
            except OSError as e:
                last = e
                await asyncio.sleep(0.1)
        raise Unavailable(f"cannot connect to guest agent socket {self.socket_path}: {last}")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None
        self._ready = False

    async def _exchange(self, script: str, deadline: float) -> AgentResult | None:
        """Send one request; None if no reply before ``deadline``."""
        assert self._reader is not None and self._writer is not None
        rid = f"r{next(self._ids)}"
        payload = base64.b64encode(script.encode()).decode()
        self._writer.write(f"\n{rid} {payload}\n".encode())
        await self._writer.drain()
        prefix = f"VXO {rid} ".encode()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                line = await asyncio.wait_for(self._reader.readline(), remaining)
            except TimeoutError:
                return None
            if not line:
                await self.close()
                raise Unavailable("guest agent connection closed (VM stopped?)")
            line = line.strip(b"\r\n")
            idx = line.find(prefix)
            if idx < 0:
                continue
            rest = line[idx + len(prefix) :]
            rc_s, _, out_b64 = rest.partition(b" ")
            try:
                rc = int(rc_s)
                out = base64.b64decode(out_b64, validate=False).decode(errors="replace")
            except ValueError:
                continue
            return AgentResult(rc, out)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with self._lock:
            await self._connect(deadline)
            while not self._ready:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"guest agent on {self.socket_path} did not answer")
                res = await self._exchange("true", min(deadline, time.monotonic() + 1.0))
                if res is not None and res.rc == 0:
                    self._ready = True

    async def run(self, script: str, timeout: float = 30.0, check: bool = False) -> AgentResult:
        """Run ``script`` with ``sh`` in the guest; combined output and exit status."""
        deadline = time.monotonic() + timeout
        if not self._ready:
            await self.wait_ready(timeout)
        async with self._lock:
            await self._connect(deadline)
            res = await self._exchange(script, deadline)
        if res is None:
            # the reply may still come later and would be mistaken for nothing: reconnect
            await self.close()
            raise TimeoutError(f"guest command timed out after {timeout}s: {script!r}")
        if check and res.rc != 0:
            raise GuestCommandError(script, res)
        return res
