"""Seed disk round trip, module resolution and the initramfs archive."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from virtua.errors import InvalidArgument
from virtua.vmm import image


def test_seed_round_trip(tmp_path: Path) -> None:
    key = 'ssh-ed25519 AAAAC3Nza\'C1lZDI1NTE5 user@host "quoted" $HOME `x`'
    p = image.build_seed(
        tmp_path / "seed.img",
        hostname="node-1",
        ip="10.1.0.11/24",
        gateway="10.1.0.1",
        vc="vc-a",
        node_index=3,
        ssh_key=key,
        run="echo hi; echo there",
    )
    data = p.read_bytes()
    assert len(data) == image.SEED_SIZE and len(data) % 512 == 0
    assert data.startswith(image.SEED_MAGIC.encode() + b"\n")
    assert data.endswith(b"\0")
    got = image.read_seed(p)
    assert got == {
        "hostname": "node-1",
        "ip": "10.1.0.11/24",
        "gateway": "10.1.0.1",
        "vc": "vc-a",
        "node_index": "3",
        "ssh_key": key,
        "run": "echo hi; echo there",
    }


def test_seed_parsed_by_busybox_sh_like_the_guest(tmp_path: Path) -> None:
    """The guest does `dd | tr -d '\\000' > f; . f` -- do exactly that with busybox."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static must be installed"
    key = "ssh-rsa AAAA'B x@y $(reboot)"
    p = image.build_seed(tmp_path / "s.img", hostname="n2", ip="192.168.7.2", ssh_key=key)
    script = (
        f"dd if={p} bs=4096 count=16 2>/dev/null | tr -d '\\000' > {tmp_path}/seed.sh; "
        f". {tmp_path}/seed.sh; "
        'printf "%s\\n%s\\n%s\\n" "$VIRTUA_HOSTNAME" "$VIRTUA_IP" "$VIRTUA_SSH_KEY"'
    )
    out = subprocess.run([busybox, "sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["n2", "192.168.7.2", key]


def test_seed_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        image.build_seed(tmp_path / "s", hostname="bad host")
    with pytest.raises(InvalidArgument):
        image.build_seed(tmp_path / "s", hostname="ok", vc="a\0b")
    with pytest.raises(InvalidArgument):
        image.build_seed(tmp_path / "s", hostname="ok", ssh_key="x" * image.SEED_SIZE)
    (tmp_path / "junk").write_bytes(b"hello\0")
    with pytest.raises(InvalidArgument):
        image.read_seed(tmp_path / "junk")


def test_resolve_modules_orders_dependencies() -> None:
    kernel = image.find_kernel()
    order = image.resolve_modules(
        image.modules_dir(kernel), ["virtio_blk", "virtio_net", "virtio_pci"]
    )
    names = [image._modname(m) for m in order]
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_blk")
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")
    assert len(names) == len(set(names))


def test_resolve_modules_synthetic(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n"
        "kernel/d-x.ko.xz: kernel/a.ko\n"
    )
    (tmp_path / "modules.builtin").write_text("kernel/fs/e.ko\n")
    (tmp_path / "modules.softdep").write_text("softdep a pre: c e post: b\n")
    assert image.resolve_modules(tmp_path, ["d_x", "e"]) == [
        "kernel/c.ko",
        "kernel/b.ko",
        "kernel/a.ko",
        "kernel/d-x.ko.xz",
    ]
    from virtua.errors import Unavailable

    with pytest.raises(Unavailable):
        image.resolve_modules(tmp_path, ["nope"])


def test_initramfs_contents_and_cache(tmp_path: Path) -> None:
    out = image.build_initramfs(tmp_path)
    assert out.name.startswith("initramfs-") and out.suffixes[-2:] == [".cpio", ".gz"]
    mtime = out.stat().st_mtime_ns
    assert image.build_initramfs(tmp_path) == out
    assert out.stat().st_mtime_ns == mtime  # reused, not rebuilt
    listing = subprocess.run(
        f"zcat {out} | cpio -t --quiet", shell=True, capture_output=True, text=True, check=True
    ).stdout.split()
    for want in (
        "init",
        "bin/busybox",
        "bin/sh",
        "sbin/switch_root",
        "dev/console",
        "lib/modules/virtio_blk.ko",
        "lib/modules/virtio_pci.ko",
        "etc/virtua-modules",
    ):
        assert want in listing, want


def test_rootfs_built_once(tmp_path: Path) -> None:
    out = image.build_rootfs(tmp_path / "root.ext4", 16 * 1024 * 1024)
    assert out.stat().st_size == 16 * 1024 * 1024
    mtime = out.stat().st_mtime_ns
    image.build_rootfs(out, 16 * 1024 * 1024)
    assert out.stat().st_mtime_ns == mtime
    cat = subprocess.run(
        ["debugfs", "-R", "cat /sbin/init", str(out)], capture_output=True, text=True, check=True
    )
    assert "VIRTUA-READY" in cat.stdout
    with pytest.raises(InvalidArgument):
        image.build_rootfs(tmp_path / "x", 1000)


def test_kernel_cmdline() -> None:
    c = image.kernel_cmdline("/dev/vda", extra="foo=1")
    assert "console=ttyS0,115200" in c and "root=/dev/vda" in c and c.endswith("foo=1")
    assert "root=" not in image.kernel_cmdline(None)
