"""The real guest-agent script, run by the host's busybox on a pty, driven by GuestAgent.

The pty stands in for the guest's ttyS1; a unix socket relays to it as QEMU's socket
chardev does.  Nothing is mocked: same script, same shell, same protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtua.vmm.agent import GuestAgent, GuestCommandError
from virtua.vmm.image import AGENT_SCRIPT


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[GuestAgent]:
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static must be installed"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for applet in ("sh", "stty", "base64", "tr", "sleep", "cat", "echo", "printf", "head"):
        (bindir / applet).symlink_to(busybox)
    script = tmp_path / "virtua-agent"
    script.write_text(AGENT_SCRIPT)
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [str(bindir / "sh"), str(script), os.ttyname(slave)],
        env={"PATH": f"{bindir}", "VIRTUA_AGENT_DIR": str(tmp_path)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(slave)
    os.set_blocking(master, False)
    loop = asyncio.get_running_loop()
    sock = tmp_path / "agent.sock"

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def from_pty() -> None:
            with contextlib.suppress(OSError):
                writer.write(os.read(master, 65536))

        loop.add_reader(master, from_pty)
        try:
            while data := await reader.read(65536):
                while data:
                    try:
                        n = os.write(master, data)
                        data = data[n:]
                    except BlockingIOError:
                        await asyncio.sleep(0.01)
        finally:
            loop.remove_reader(master)
            writer.close()

    server = await asyncio.start_unix_server(relay, path=str(sock))
    ga = GuestAgent(sock)
    try:
        yield ga
    finally:
        await ga.close()
        server.close()
        proc.kill()
        proc.wait()
        os.close(master)


async def test_run_output_and_status(agent: GuestAgent) -> None:
    await agent.wait_ready(timeout=10)
    res = await agent.run("echo hello; echo err >&2; exit 3")
    assert res.rc == 3 and not res.ok
    assert res.output == "hello\nerr\n"
    res = await agent.run("printf 'a b\\tc\\n\\303\\251\\n'; true")
    assert res.ok and res.output == "a b\tc\né\n"


async def test_quoting_and_size(agent: GuestAgent) -> None:
    tricky = 'it\'s "quoted" $HOME `x` \\ ; | & > <'
    res = await agent.run(f"cat <<'EOF'\n{tricky}\nEOF")
    assert res.output == tricky + "\n"
    res = await agent.run("i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done")
    lines = res.output.splitlines()
    assert len(lines) == 2000 and lines[-1] == "line-1999"


async def test_background_job_does_not_block(agent: GuestAgent) -> None:
    t = time.monotonic()
    res = await agent.run("sleep 5 & echo started")
    assert res.output == "started\n"
    assert time.monotonic() - t < 3


async def test_check_and_timeout(agent: GuestAgent) -> None:
    with pytest.raises(GuestCommandError) as ei:
        await agent.run("echo nope; false", check=True)
    assert ei.value.result.output == "nope\n"
    with pytest.raises(TimeoutError):
        await agent.run("sleep 3", timeout=1.0)
    # the late reply of the timed-out command is not taken for the next one's
    await asyncio.sleep(2.5)
    res = await agent.run("echo after")
    assert res.output == "after\n"
