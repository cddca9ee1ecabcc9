"""Boot real guests (TCG fallback automatic) with their root disk served over NBD."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import pytest

from virtua.vmm import DiskSpec, NicSpec, VMProcess, build_seed, make_spec, probe_kvm
from virtua.vmm.qemu import select_accel

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PATTERN = 0x5A


def copy_sparse(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def test_kvm_probe_cached_and_tcg_here(artifacts, tmp_path: Path) -> None:
    t = time.monotonic()
    first = probe_kvm(cache_dir=tmp_path, kernel=artifacts.kernel, initrd=artifacts.initrd)
    assert isinstance(first, bool)
    assert (tmp_path / "kvm-probe.json").exists()
    t2 = time.monotonic()
    again = probe_kvm(cache_dir=tmp_path, kernel=artifacts.kernel, initrd=artifacts.initrd)
    assert again is first
    assert time.monotonic() - t2 < 2.0, "second probe must come from the cache"
    # this machine's /dev/kvm is kvm_pvm: a stock kernel cannot boot, so TCG it is
    assert first is False, f"unexpected KVM on this host (probe took {t2 - t:.1f}s)"
    assert select_accel("auto", cache_dir=tmp_path, kernel=artifacts.kernel) == "tcg"


async def test_boot_over_nbd_write_and_read_back(artifacts, short_tmp: Path, nbd_server, vms):
    root = copy_sparse(artifacts.rootfs, short_tmp / "root.img")
    swap = short_tmp / "swap.img"
    swap.write_bytes(b"")
    subprocess.run(["truncate", "-s", "32M", str(swap)], check=True)
    data = short_tmp / "data.img"
    subprocess.run(["truncate", "-s", "8M", str(data)], check=True)
    seed = build_seed(
        short_tmp / "seed.img",
        hostname="node1",
        ip="10.0.0.11/24",
        gateway="10.0.0.1",
        vc="vc1",
        node_index=1,
        ssh_key="ssh-ed25519 AAAAtest t@x",
    )
    # root over TCP (export name with '/'), data over a unix socket
    root_srv = nbd_server(root, "pool/node1-root")
    data_srv = nbd_server(data, "pool/node1-data", unix=short_tmp / "data.nbd")

    spec = make_spec(
        "node1",
        short_tmp / "vm",
        artifacts,
        disks=[
            DiskSpec(source=root_srv.uri),  # vda
            DiskSpec(source=str(swap)),  # vdb: swap, mkswap'ed on first boot
            DiskSpec(source=str(seed), readonly=True),  # vdc: seed
            DiskSpec(source=data_srv.uri),  # vdd
        ],
        nics=[NicSpec(kind="user", mac="52:54:00:00:01:01")],
    )
    assert spec.accel == ("kvm" if probe_kvm() else "tcg")
    vm = VMProcess(spec)
    vms.append(vm)
    t = time.monotonic()
    await vm.start()
    m = await vm.wait_for_console(r"VIRTUA-READY hostname=(\S+) ip=(\S+)", timeout=90)
    boot_s = time.monotonic() - t
    print(f"boot to VIRTUA-READY: {boot_s:.2f}s ({spec.accel})")
    assert m.groups() == ("node1", "10.0.0.11")
    kvm = await vm.qmp("query-kvm")
    assert kvm["enabled"] is (spec.accel == "kvm")  # type: ignore[index]

    res = await vm.run(
        "hostname; cat /proc/swaps; ip -4 addr show eth0; cat /root/.ssh/authorized_keys"
    )
    assert res.output.splitlines()[0] == "node1"
    assert "/dev/vdb" in res.output
    assert "10.0.0.11/24" in res.output
    assert "ssh-ed25519 AAAAtest t@x" in res.output
    assert (await vm.run("mount | grep ' / '")).output.startswith("/dev/vda on / type ext4 (rw")

    # the interactive console: a root shell on ttyS0 behind console.sock, logged
    off = vm.console_offset()
    reader, writer = await asyncio.open_unix_connection(str(spec.console_socket))
    writer.write(b"echo console-$((6 * 7))\n")
    await writer.drain()
    await vm.wait_for_console(r"console-42", timeout=20, start=off)
    writer.close()

    await vm.run(
        "echo virtua-pattern-$(hostname) > /root/marker.txt && "
        f"dd if=/dev/zero bs=65536 count=1 2>/dev/null | tr '\\000' '\\{PATTERN:03o}' | "
        "dd of=/dev/vdd bs=65536 seek=16 conv=fsync 2>/dev/null && sync"
    )
    how = await vm.stop(timeout=30)
    assert how == "powerdown"  # ACPI button -> guest init unmounts and powers off
    assert await vm.status() == "stopped"
    root_srv.stop()
    data_srv.stop()

    cat = subprocess.run(
        ["debugfs", "-R", "cat /root/marker.txt", str(root)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert cat.stdout.strip() == "virtua-pattern-node1"
    fsck = subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    io = subprocess.run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            f"read -P {PATTERN:#x} 1M 64k",
            "-c",
            "read -P 0 0 1M",
            str(data),
        ],
        capture_output=True,
        text=True,
    )
    assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout
    assert swap.read_bytes()[4086:4096] == b"SWAPSPACE2"


async def test_suspend_resume_counter_continues(artifacts, short_tmp: Path, nbd_server, vms):
    root = copy_sparse(artifacts.rootfs, short_tmp / "root.img")
    seed = build_seed(short_tmp / "seed.img", hostname="node2", swap="none")
    srv = nbd_server(root, "pool/node2@base", unix=short_tmp / "root.nbd")
    run_dir = short_tmp / "vm"
    spec = make_spec(
        "node2",
        run_dir,
        artifacts,
        disks=[DiskSpec(source=srv.uri), DiskSpec(source=str(seed), readonly=True)],
    )
    vm = VMProcess(spec)
    vms.append(vm)
    await vm.start()
    await vm.wait_for_console(r"VIRTUA-READY hostname=node2", timeout=90)
    await vm.run(
        "(i=0; while :; do echo COUNTER $i > /dev/console; i=$((i+1)); usleep 200000; done) "
        "</dev/null >/dev/null 2>&1 &"
    )
    await vm.wait_for_console(r"COUNTER 5\b", timeout=30)

    state = short_tmp / "state.bin"
    t = time.monotonic()
    await vm.suspend(state)
    print(f"suspend: {time.monotonic() - t:.2f}s, state {state.stat().st_size >> 20} MiB")
    assert not vm.is_running()
    before = [int(x) for x in re.findall(r"COUNTER (\d+)", vm.console_text())]
    last = before[-1]
    offset = vm.console_offset()
    await asyncio.sleep(1.0)
    assert vm.console_offset() == offset  # really not running

    # a new controller (as after a restart) resumes it
    vm2 = await VMProcess.attach(run_dir)
    assert await vm2.status() == "stopped"
    t = time.monotonic()
    await vm2.resume(state)
    print(f"resume: {time.monotonic() - t:.2f}s")
    assert await vm2.status() == "running"
    await vm2.wait_for_console(r"COUNTER \d+\s+COUNTER \d+", timeout=30, start=offset)
    # judge the whole log (a line may straddle the suspend point): one unbroken sequence
    # 0, 1, 2, ... that goes on past the last value printed before the suspend
    full = [int(x) for x in re.findall(r"COUNTER (\d+)", vm2.console_text())]
    assert full == list(range(len(full))), full
    assert full[-1] > last + 1, (last, full[-3:])
    assert vm2.console_text().count("VIRTUA-READY") == 1  # no reboot happened

    # the guest (and its NBD root disk) still work; a third controller reattaches live
    await vm2.agent.close()  # type: ignore[union-attr]
    await vm2._disconnect_qmp()
    vm3 = await VMProcess.attach(run_dir)
    assert await vm3.status() == "running"
    assert (
        await vm3.run("echo alive > /root/after-resume && sync && cat /root/after-resume")
    ).output == "alive\n"
    assert await vm3.stop(timeout=30) == "powerdown"
    srv.stop()
    cat = subprocess.run(
        ["debugfs", "-R", "cat /root/after-resume", str(root)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert cat.stdout.strip() == "alive"
