"""asyncio controller for one QEMU guest.

A VM lives in a *run directory*::

    spec.json     the VMSpec it was started with (for reattach / resume)
    qemu.pid      written by QEMU (-pidfile)
    qmp.sock      QMP (one client at a time)
    console.sock  ttyS0, interactive shell; everything written is also in serial.log
    agent.sock    ttyS1, the guest agent (virtua.vmm.agent)
    serial.log    console log, appended across restarts/resumes
    qemu.stderr   QEMU's stderr until it daemonized

QEMU is started with ``-daemonize`` (double fork + setsid), so it survives the controller;
:meth:`VMProcess.attach` finds it again through the pidfile and the QMP socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import time
from pathlib import Path
from typing import Literal

from qemu.qmp import QMPClient, QMPError

from virtua.errors import Busy, InvalidArgument, NotFound, Unavailable
from virtua.vmm.agent import AgentResult, GuestAgent
from virtua.vmm.image import GuestArtifacts, kernel_cmdline
from virtua.vmm.qemu import DiskSpec, NicSpec, VMSpec, build_cmdline, select_accel


def make_spec(
    name: str,
    run_dir: Path,
    artifacts: GuestArtifacts,
    *,
    disks: list[DiskSpec] | None = None,
    nics: list[NicSpec] | None = None,
    cpus: int = 1,
    memory_mib: int = 256,
    accel: str = "auto",
    root: str | None = "/dev/vda",
    append_extra: str = "",
    cache_dir: Path | None = None,
) -> VMSpec:
    """A VMSpec using the standard run-directory layout.  ``accel='auto'`` probes KVM."""
    run_dir = Path(run_dir).absolute()
    return VMSpec(
        name=name,
        cpus=cpus,
        memory_mib=memory_mib,
        kernel=artifacts.kernel,
        initrd=artifacts.initrd,
        append=kernel_cmdline(root, extra=append_extra),
        disks=disks or [],
        nics=nics or [],
        accel=select_accel(
            accel, cache_dir=cache_dir, kernel=artifacts.kernel, initrd=artifacts.initrd
        ),
        serial_log=run_dir / "serial.log",
        console_socket=run_dir / "console.sock",
        agent_socket=run_dir / "agent.sock",
        qmp_socket=run_dir / "qmp.sock",
        pidfile=run_dir / "qemu.pid",
    )


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


class VMProcess:
    def __init__(self, spec: VMSpec) -> None:
        self.spec = spec
        self.run_dir = spec.pidfile.parent
        self._qmp: QMPClient | None = None
        self.agent = GuestAgent(spec.agent_socket) if spec.agent_socket else None
        # console log offset when this controller last started QEMU (the log is appended)
        self.start_offset = 0

    # ------------------------------------------------------------------ paths/identity
    @property
    def console_log(self) -> Path:
        return self.spec.serial_log

    @property
    def spec_file(self) -> Path:
        return self.run_dir / "spec.json"

    @property
    def pid(self) -> int | None:
        try:
            return int(self.spec.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        """Is the QEMU process of this VM alive (not a zombie, and really ours)?"""
        pid = self.pid
        if pid is None:
            return False
        state = _proc_state(pid)
        if state is None or state in ("Z", "X"):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"guest={self.spec.name},".encode() in b"\0".join(cmdline) or (
            f"guest={self.spec.name}".encode() in cmdline
        )

    @classmethod
    async def attach(cls, run_dir: Path) -> VMProcess:
        """Reattach to a VM started by an earlier controller (pidfile + QMP socket)."""
        spec_file = Path(run_dir) / "spec.json"
        if not spec_file.exists():
            raise NotFound(f"no VM in {run_dir}")
        vm = cls(VMSpec.model_validate_json(spec_file.read_text()))
        if vm.is_running():
            await vm._connect_qmp()
        return vm

    # ------------------------------------------------------------------ QMP
    async def _connect_qmp(self, timeout: float = 10.0) -> QMPClient:
        if self._qmp is not None and self._qmp.runstate.name == "RUNNING":
            return self._qmp
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            client = QMPClient(self.spec.name)
            try:
                # a QMP chardev serves one client at a time: a second client's connect is
                # accepted by the kernel but never greeted, so bound it
                await asyncio.wait_for(
                    client.connect(str(self.spec.qmp_socket)),
                    max(0.5, min(3.0, deadline - time.monotonic())),
                )
                self._qmp = client
                return client
            except (TimeoutError, QMPError, OSError) as e:
                last = e
                with contextlib.suppress(Exception):
                    await client.disconnect()
                if not self.is_running():
                    break
                await asyncio.sleep(0.1)
        raise Unavailable(
            f"cannot connect QMP {self.spec.qmp_socket}: {last} "
            "(QMP serves one client at a time: is another controller attached?)"
        )

    async def qmp(self, cmd: str, **args: object) -> object:
        client = await self._connect_qmp()
        return await client.execute(cmd, args or None)

    async def _disconnect_qmp(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            self._qmp = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, *, incoming: str | None = None) -> None:
        """Spawn QEMU (daemonized, own session) and connect QMP."""
        if self.is_running():
            raise Busy(f"VM {self.spec.name} is already running (pid {self.pid})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o700)  # the agent socket is a root shell
        for p in (
            self.spec.qmp_socket,
            self.spec.console_socket,
            self.spec.agent_socket,
            self.spec.pidfile,
        ):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        self.start_offset = self.console_offset()
        spec = self.spec.model_copy(update={"incoming": incoming, "daemonize": True})
        self.spec_file.write_text(self.spec.model_dump_json(indent=2))
        argv = build_cmdline(spec)
        stderr_path = self.run_dir / "qemu.stderr"
        with stderr_path.open("wb") as err:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    start_new_session=True,
                )
            except FileNotFoundError as e:
                raise Unavailable(f"{argv[0]} not found (install qemu-system-x86)") from e
            rc = await proc.wait()
        if rc != 0:
            raise Unavailable(
                f"qemu failed to start VM {self.spec.name} (rc={rc}): "
                f"{stderr_path.read_text(errors='replace').strip()[-2000:]}"
            )
        for _ in range(50):
            if self.pid is not None:
                break
            await asyncio.sleep(0.02)
        await self._connect_qmp()
        if self.agent:
            await self.agent.close()

    async def status(self) -> str:
        """QEMU run state ('running', 'paused', 'inmigrate', 'shutdown', ...) or 'stopped'."""
        if not self.is_running():
            return "stopped"
        try:
            res = await self.qmp("query-status")
        except (QMPError, Unavailable, OSError):
            return "stopped" if not self.is_running() else "unknown"
        assert isinstance(res, dict)
        return str(res["status"])

    async def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_running():
                await self._cleanup()
                return True
            await asyncio.sleep(0.05)
        return False

    async def _cleanup(self) -> None:
        await self._disconnect_qmp()
        if self.agent:
            await self.agent.close()

    async def stop(self, timeout: float = 30.0) -> Literal["powerdown", "quit", "kill", "stopped"]:
        """Graceful: ACPI power button (guest unmounts + powers off), then quit, then kill."""
        if not self.is_running():
            await self._cleanup()
            return "stopped"
        with contextlib.suppress(QMPError, Unavailable, OSError):
            st = await self.status()
            if st == "running":
                await self.qmp("system_powerdown")
                if await self.wait_exit(timeout):
                    return "powerdown"
        with contextlib.suppress(QMPError, Unavailable, OSError, EOFError):
            await self.qmp("quit")
        if await self.wait_exit(5):
            return "quit"
        await self.kill()
        return "kill"

    async def kill(self) -> None:
        pid = self.pid
        if pid is not None and self.is_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self.wait_exit(10)
        await self._cleanup()

    # ------------------------------------------------------------------ suspend/resume
    async def suspend(self, state_file: Path, timeout: float = 120.0) -> None:
        """Save the VM (CPU + RAM + devices) to ``state_file`` and end the QEMU process."""
        state_file = Path(state_file).absolute()
        state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_name(state_file.name + ".part")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        await self.qmp("stop")
        await self.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        await self.qmp("migrate", uri=f"exec:cat > {shlex.quote(str(tmp))}")
        deadline = time.monotonic() + timeout
        while True:
            info = await self.qmp("query-migrate")
            assert isinstance(info, dict)
            st = info.get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled"):
                await self.qmp("cont")
                raise Unavailable(
                    f"suspend of {self.spec.name} failed: {info.get('error-desc', st)}"
                )
            if time.monotonic() > deadline:
                with contextlib.suppress(QMPError):
                    await self.qmp("migrate_cancel")
                raise TimeoutError(f"suspend of {self.spec.name} timed out")
            await asyncio.sleep(0.05)
        os.replace(tmp, state_file)
        with contextlib.suppress(QMPError, Unavailable, OSError, EOFError):
            await self.qmp("quit")
        if not await self.wait_exit(10):
            await self.kill()

    async def resume(self, state_file: Path, timeout: float = 120.0) -> None:
        """Start QEMU with ``-incoming``, load ``state_file`` and continue the guest."""
        state_file = Path(state_file).absolute()
        if not state_file.exists():
            raise NotFound(f"no saved state {state_file}")
        await self.start(incoming="defer")
        await self.qmp("migrate-incoming", uri=f"exec:cat {shlex.quote(str(state_file))}")
        deadline = time.monotonic() + timeout
        while True:
            st = await self.status()
            if st in ("paused", "running", "postmigrate"):
                break
            if st != "inmigrate" or time.monotonic() > deadline:
                info = await self.qmp("query-migrate")
                await self.kill()
                raise Unavailable(f"resume of {self.spec.name} failed (status {st}): {info}")
            await asyncio.sleep(0.05)
        if st != "running":
            await self.qmp("cont")

    # ------------------------------------------------------------------ console
    def console_offset(self) -> int:
        try:
            return self.console_log.stat().st_size
        except FileNotFoundError:
            return 0

    def console_text(self, start: int = 0) -> str:
        try:
            with self.console_log.open("rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_for_console(
        self, pattern: str | re.Pattern[str], timeout: float = 60.0, *, start: int | None = None
    ) -> re.Match[str]:
        """Wait until ``pattern`` appears in the console log after byte ``start``.

        ``start`` defaults to where the log ended when this controller last started QEMU
        (0 for an attached VM), so an earlier boot's output does not match.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        if start is None:
            start = self.start_offset
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_text(start)
            m = rx.search(text)
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{rx.pattern!r} not on console of {self.spec.name} within {timeout}s; "
                    f"tail: {text[-800:]!r}"
                )
            if not self.is_running():
                raise Unavailable(
                    f"VM {self.spec.name} exited while waiting for {rx.pattern!r}; "
                    f"tail: {text[-800:]!r}"
                )
            await asyncio.sleep(0.1)

    async def run(self, script: str, timeout: float = 30.0, check: bool = True) -> AgentResult:
        """Run ``script`` in the guest via the agent; ``check`` raises GuestCommandError on rc != 0."""
        if self.agent is None:
            raise InvalidArgument(f"VM {self.spec.name} has no agent socket")
        return await self.agent.run(script, timeout=timeout, check=check)
