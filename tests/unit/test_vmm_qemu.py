"""The QEMU command-line builder is pure: no QEMU is started here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from virtua.errors import InvalidArgument
from virtua.vmm import qemu
from virtua.vmm.qemu import DiskSpec, NicSpec, VMSpec, build_cmdline, parse_nbd_uri


def _spec(tmp: Path = Path("/run/vt/n1"), **kw: object) -> VMSpec:
    base: dict[str, object] = dict(
        name="node1",
        kernel=Path("/boot/vmlinuz-x"),
        initrd=Path("/cache/initramfs.cpio.gz"),
        append="console=ttyS0 root=/dev/vda rw",
        serial_log=tmp / "serial.log",
        console_socket=tmp / "console.sock",
        agent_socket=tmp / "agent.sock",
        qmp_socket=tmp / "qmp.sock",
        pidfile=tmp / "qemu.pid",
    )
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def _kv(opt: str) -> dict[str, str]:
    """Parse QEMU key=value,key=value (commas doubled inside values)."""
    out: dict[str, str] = {}
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(opt):
        if opt[i] == ",":
            if opt[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += opt[i]
        i += 1
    parts.append(cur)
    for p in parts:
        k, _, v = p.partition("=")
        out[k] = v
    return out


def test_headless_basics() -> None:
    argv = build_cmdline(_spec(cpus=2, memory_mib=512))
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-daemonize"):
        assert flag in argv
    assert _opt(argv, "-display") == ["none"]
    assert _opt(argv, "-smp") == ["2"]
    assert _opt(argv, "-m") == ["512"]
    assert _opt(argv, "-kernel") == ["/boot/vmlinuz-x"]
    assert _opt(argv, "-initrd") == ["/cache/initramfs.cpio.gz"]
    assert _opt(argv, "-append") == ["console=ttyS0 root=/dev/vda rw"]
    assert _opt(argv, "-pidfile") == ["/run/vt/n1/qemu.pid"]
    assert _opt(argv, "-serial") == ["chardev:console", "chardev:agent"]
    chardevs = [_kv(c) for c in _opt(argv, "-chardev")]
    console = next(c for c in chardevs if c.get("id") == "console")
    assert console["path"] == "/run/vt/n1/console.sock"
    assert console["logfile"] == "/run/vt/n1/serial.log"
    assert console["server"] == "on" and console["wait"] == "off"
    qmp = next(c for c in chardevs if c.get("id") == "qmp")
    assert qmp["path"] == "/run/vt/n1/qmp.sock"
    assert _opt(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert "-incoming" not in argv


def test_accel_and_cpu() -> None:
    tcg = build_cmdline(_spec(accel="tcg"))
    assert _opt(tcg, "-machine") == ["pc,accel=tcg"]
    assert _opt(tcg, "-cpu") == ["max"]
    kvm = build_cmdline(_spec(accel="kvm"))
    assert _opt(kvm, "-machine") == ["pc,accel=kvm"]
    assert _opt(kvm, "-cpu") == ["host"]
    with pytest.raises(ValidationError):
        _spec(accel="hvf")


def test_nbd_disks_inet_and_unix_with_slash_and_at() -> None:
    argv = build_cmdline(
        _spec(
            disks=[
                DiskSpec(source="nbd://127.0.0.1:10809/pool/vol"),
                DiskSpec(
                    source="nbd+unix:///pool/vol@snap1?socket=/run/virtua/nbd.sock", readonly=True
                ),
                DiskSpec(source="nbd://[::1]:7000/pool/a%40b", reconnect_delay=5, serial="data"),
            ]
        )
    )
    bd = [_kv(b) for b in _opt(argv, "-blockdev")]
    assert bd[0] == {
        "driver": "nbd",
        "node-name": "disk0",
        "server.type": "inet",
        "server.host": "127.0.0.1",
        "server.port": "10809",
        "export": "pool/vol",
        "read-only": "off",
        "discard": "unmap",
    }
    assert bd[1]["server.type"] == "unix"
    assert bd[1]["server.path"] == "/run/virtua/nbd.sock"
    assert bd[1]["export"] == "pool/vol@snap1"
    assert bd[1]["read-only"] == "on"
    assert "discard" not in bd[1]
    assert bd[2]["server.host"] == "::1" and bd[2]["server.port"] == "7000"
    assert bd[2]["export"] == "pool/a@b"
    assert bd[2]["reconnect-delay"] == "5"
    devs = [_kv(d) for d in _opt(argv, "-device")]
    assert [d["driver"] for d in devs] == ["virtio-blk-pci"] * 3
    assert [d["drive"] for d in devs] == ["disk0", "disk1", "disk2"]
    assert devs[2]["serial"] == "data"


def test_file_disk_comma_escaped() -> None:
    argv = build_cmdline(_spec(disks=[DiskSpec(source="/img/we,ird.qcow2", format="qcow2")]))
    raw = _opt(argv, "-blockdev")[0]
    assert "we,,ird" in raw
    bd = _kv(raw)
    assert bd["driver"] == "qcow2" and bd["file.filename"] == "/img/we,ird.qcow2"


def test_parse_nbd_uri_errors() -> None:
    assert parse_nbd_uri("nbd://h/x")["server.port"] == "10809"
    with pytest.raises(InvalidArgument):
        parse_nbd_uri("nbd+unix:///x")  # no socket
    with pytest.raises(InvalidArgument):
        parse_nbd_uri("http://h/x")
    with pytest.raises(InvalidArgument):
        parse_nbd_uri("nbd:///x")  # no host


def test_nics() -> None:
    argv = build_cmdline(
        _spec(
            nics=[
                NicSpec(kind="user", mac="52:54:00:AA:00:01", hostfwd=["tcp::2222-:22"]),
                NicSpec(kind="tap", ifname="vt-n1-0", mac="52:54:00:aa:00:02"),
                NicSpec(kind="mcast", addr="230.0.0.1:4000"),
            ]
        )
    )
    nd = _opt(argv, "-netdev")
    assert nd[0] == "user,id=net0,hostfwd=tcp::2222-:22"
    assert nd[1] == "tap,id=net1,ifname=vt-n1-0,script=no,downscript=no"
    assert nd[2] == "socket,id=net2,mcast=230.0.0.1:4000"
    devs = [d for d in _opt(argv, "-device") if d.startswith("virtio-net")]
    assert devs[0] == "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:aa:00:01"
    with pytest.raises(ValidationError):
        NicSpec(mac="zz:54:00:aa:00:01")
    with pytest.raises(InvalidArgument):
        build_cmdline(_spec(nics=[NicSpec(kind="tap")]))


def test_incoming_and_no_daemonize() -> None:
    argv = build_cmdline(_spec(incoming="defer", daemonize=False))
    assert _opt(argv, "-incoming") == ["defer"]
    assert "-daemonize" not in argv


def test_socket_path_too_long() -> None:
    with pytest.raises(InvalidArgument):
        build_cmdline(_spec(tmp=Path("/tmp/" + "x" * 120)))


def test_bad_name_and_sizes() -> None:
    for bad in ("", "a b", "a,b", "../x"):
        with pytest.raises(ValidationError):
            _spec(name=bad)
    with pytest.raises(ValidationError):
        _spec(cpus=0)
    with pytest.raises(ValidationError):
        _spec(memory_mib=1)


def test_spec_json_round_trip() -> None:
    s = _spec(disks=[DiskSpec(source="nbd://127.0.0.1:1/p/v@s")], nics=[NicSpec()])
    again = VMSpec.model_validate_json(s.model_dump_json())
    assert again == s
    assert build_cmdline(again) == build_cmdline(s)


def test_select_accel_passthrough_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert qemu.select_accel("tcg") == "tcg"
    assert qemu.select_accel("kvm") == "kvm"
    with pytest.raises(InvalidArgument):
        qemu.select_accel("xen")
    monkeypatch.setenv("VIRTUA_ACCEL", "tcg")
    assert qemu.probe_kvm() is False
    assert qemu.select_accel("auto") == "tcg"


def test_probe_cache_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache entry with a matching key is answered without booting anything."""
    monkeypatch.delenv("VIRTUA_ACCEL", raising=False)
    kernel = tmp_path / "vmlinuz-9.9.9-test"
    kernel.write_bytes(b"")
    key = {"kernel": "9.9.9-test", "qemu": qemu.qemu_version(), "kvm": qemu._kvm_identity()}
    (tmp_path / "kvm-probe.json").write_text(json.dumps({"key": key, "kvm": True}))
    assert qemu.probe_kvm(cache_dir=tmp_path, kernel=kernel) is True
    (tmp_path / "kvm-probe.json").write_text(json.dumps({"key": key, "kvm": False}))
    assert qemu.probe_kvm(cache_dir=tmp_path, kernel=kernel) is False
