"""QEMU command lines (pure) and the KVM probe.

:func:`build_cmdline` turns a :class:`VMSpec` into an argv list; it touches no files and
starts nothing, so it is unit-testable.  :func:`probe_kvm` really boots the guest kernel
with ``-accel kvm`` and caches whether it reached userspace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlparse

from pydantic import BaseModel, Field, field_validator

from virtua.errors import InvalidArgument, Unavailable

QEMU_BINARY = "qemu-system-x86_64"
TLS_CREDS_ID = "virtua-tls"
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the NUL


class DiskSpec(BaseModel):
    """One virtio-blk disk: an NBD URI or a local image file."""

    source: str
    readonly: bool = False
    format: Literal["raw", "qcow2"] = "raw"  # files only; NBD exports are raw
    serial: str | None = None
    reconnect_delay: int = 0  # NBD: seconds to keep retrying after the server drops
    # nbds://: the name the server's certificate must carry (QEMU otherwise checks the
    # address, which any certificate of the same CA issued for that address passes)
    tls_hostname: str | None = None
    discard: bool = True

    @property
    def is_nbd(self) -> bool:
        return self.source.startswith(("nbd://", "nbds://", "nbd+unix://", "nbd+tcp://"))

    @property
    def tls(self) -> bool:
        """nbds:// (libnbd's spelling): NBD over TLS, with the VM's tls-creds-x509."""
        return self.source.startswith("nbds://")


class NicSpec(BaseModel):
    """One virtio-net NIC: a host tap device, user-mode networking, or a socket backend."""

    kind: Literal["user", "tap", "mcast", "listen", "connect"] = "user"
    ifname: str | None = None  # tap device name
    addr: str | None = None  # mcast group / listen / connect "host:port"
    mac: str | None = None
    hostfwd: list[str] = Field(default_factory=list)  # user-mode, e.g. "tcp::2222-:22"

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", v):
            raise ValueError(f"bad MAC address {v!r}")
        return v.lower() if v else v


class VMSpec(BaseModel):
    name: str
    cpus: int = 1
    memory_mib: int = 256
    kernel: Path
    initrd: Path | None = None
    append: str = ""
    disks: list[DiskSpec] = Field(default_factory=list)
    # QEMU's tls-creds-x509 client directory (ca-cert.pem, client-cert.pem,
    # client-key.pem) for nbds:// disks: the command line names the directory, never a key
    tls_creds_dir: Path | None = None
    nics: list[NicSpec] = Field(default_factory=list)
    accel: Literal["kvm", "tcg"] = "tcg"
    machine: str = "pc"
    cpu_model: str | None = None  # default: host (kvm) / max (tcg)
    serial_log: Path  # everything the guest writes to ttyS0
    console_socket: Path  # ttyS0, interactive: connect with socat/nc -U
    agent_socket: Path | None = None  # ttyS1, the agent line protocol (virtua.vmm.agent)
    qmp_socket: Path
    pidfile: Path
    incoming: str | None = None  # "defer" or a migration URI
    daemonize: bool = True
    extra_args: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
            raise ValueError(f"bad VM name {v!r}")
        return v

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, v: int) -> int:
        if not 1 <= v <= 64:
            raise ValueError("cpus must be 1..64")
        return v

    @field_validator("memory_mib")
    @classmethod
    def _mem(cls, v: int) -> int:
        if not 32 <= v <= 1 << 20:
            raise ValueError("memory_mib must be >= 32")
        return v


def _esc(value: str) -> str:
    """Escape a value for QEMU's key=value option syntax (a comma is written twice)."""
    return str(value).replace(",", ",,")


def parse_nbd_uri(uri: str) -> dict[str, str]:
    """``nbd://host[:port]/export`` or ``nbd+unix:///export?socket=PATH`` -> blockdev keys.

    The export name is everything after the first ``/`` of the path, percent-decoded, so it
    may contain ``/`` and ``@`` (``nbd://127.0.0.1:10809/pool/vol@snap``).
    """
    u = urlparse(uri)
    export = unquote(u.path[1:]) if u.path.startswith("/") else unquote(u.path)
    if u.scheme in ("nbd", "nbds", "nbd+tcp"):
        if not u.hostname:
            raise InvalidArgument(f"NBD URI without host: {uri}")
        host = u.hostname
        port = str(u.port or 10809)
        return {"server.type": "inet", "server.host": host, "server.port": port, "export": export}
    if u.scheme == "nbd+unix":
        sock = parse_qs(u.query).get("socket", [""])[0]
        if not sock:
            raise InvalidArgument(f"nbd+unix URI needs ?socket=PATH: {uri}")
        return {"server.type": "unix", "server.path": sock, "export": export}
    raise InvalidArgument(f"unsupported disk URI {uri!r}")


def _blockdev(i: int, d: DiskSpec) -> list[str]:
    node = f"disk{i}"
    opts: list[tuple[str, str]]
    if d.is_nbd:
        opts = [("driver", "nbd"), ("node-name", node)]
        opts += list(parse_nbd_uri(d.source).items())
        if d.tls:
            opts.append(("tls-creds", TLS_CREDS_ID))
            if d.tls_hostname:
                opts.append(("tls-hostname", d.tls_hostname))
        if d.reconnect_delay:
            opts.append(("reconnect-delay", str(d.reconnect_delay)))
    else:
        opts = [
            ("driver", d.format),
            ("node-name", node),
            ("file.driver", "file"),
            ("file.filename", d.source),
        ]
    opts.append(("read-only", "on" if d.readonly else "off"))
    if d.discard and not d.readonly:
        opts.append(("discard", "unmap"))
    dev = [("driver", "virtio-blk-pci"), ("drive", node), ("id", f"vd{i}")]
    if d.serial:
        dev.append(("serial", d.serial))
    return [
        "-blockdev",
        ",".join(f"{k}={_esc(v)}" for k, v in opts),
        "-device",
        ",".join(f"{k}={_esc(v)}" for k, v in dev),
    ]


def _netdev(i: int, n: NicSpec) -> list[str]:
    nid = f"net{i}"
    if n.kind == "user":
        opts = [f"user,id={nid}"] + [f"hostfwd={_esc(h)}" for h in n.hostfwd]
    elif n.kind == "tap":
        if not n.ifname:
            raise InvalidArgument("tap NIC needs ifname")
        opts = [f"tap,id={nid},ifname={_esc(n.ifname)},script=no,downscript=no"]
    else:
        if not n.addr:
            raise InvalidArgument(f"{n.kind} NIC needs addr host:port")
        opts = [f"socket,id={nid},{n.kind}={_esc(n.addr)}"]
    dev = f"virtio-net-pci,netdev={nid},id=nic{i}"
    if n.mac:
        dev += f",mac={n.mac}"
    return ["-netdev", ",".join(opts), "-device", dev]


def _sock(p: Path) -> str:
    s = str(p)
    if len(s.encode()) > SOCKET_PATH_MAX:
        raise InvalidArgument(f"socket path too long ({len(s)} > {SOCKET_PATH_MAX}): {s}")
    return _esc(s)


def build_cmdline(spec: VMSpec, qemu: str = QEMU_BINARY) -> list[str]:
    """The full QEMU argv for ``spec`` (headless, no default devices)."""
    cpu = spec.cpu_model or ("host" if spec.accel == "kvm" else "max")
    argv = [
        qemu,
        "-name",
        f"guest={_esc(spec.name)},process=virtua-{_esc(spec.name)}",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        f"{spec.machine},accel={spec.accel}",
        "-cpu",
        cpu,
        "-smp",
        str(spec.cpus),
        "-m",
        str(spec.memory_mib),
        "-kernel",
        str(spec.kernel),
    ]
    if spec.initrd:
        argv += ["-initrd", str(spec.initrd)]
    if spec.append:
        argv += ["-append", spec.append]
    # ttyS0: interactive console socket, everything logged to serial_log
    argv += [
        "-chardev",
        f"socket,id=console,path={_sock(spec.console_socket)},server=on,wait=off,"
        f"logfile={_esc(str(spec.serial_log))},logappend=on",
        "-serial",
        "chardev:console",
    ]
    if spec.agent_socket:
        argv += [
            "-chardev",
            f"socket,id=agent,path={_sock(spec.agent_socket)},server=on,wait=off",
            "-serial",
            "chardev:agent",
        ]
    argv += [
        "-chardev",
        f"socket,id=qmp,path={_sock(spec.qmp_socket)},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-pidfile",
        str(spec.pidfile),
    ]
    if spec.daemonize:
        argv.append("-daemonize")
    if any(d.tls for d in spec.disks):
        if spec.tls_creds_dir is None:
            raise InvalidArgument("an nbds:// disk needs the VM's tls_creds_dir")
        argv += [
            "-object",
            f"tls-creds-x509,id={TLS_CREDS_ID},dir={_esc(str(spec.tls_creds_dir))},endpoint=client,verify-peer=on",
        ]
    for i, d in enumerate(spec.disks):
        argv += _blockdev(i, d)
    for i, n in enumerate(spec.nics):
        argv += _netdev(i, n)
    if spec.incoming:
        argv += ["-incoming", spec.incoming]
    argv += spec.extra_args
    return argv


# ---------------------------------------------------------------------------------------
# KVM probe


def qemu_version(qemu: str = QEMU_BINARY) -> str:
    exe = shutil.which(qemu)
    if not exe:
        raise Unavailable(f"{qemu} not found (install qemu-system-x86)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    first = out.stdout.splitlines()[0] if out.stdout else ""
    m = re.search(r"version (\S+)", first)
    return m.group(1) if m else first


def _kvm_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def probe_kvm(
    timeout: float = 10.0,
    *,
    cache_dir: Path | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
    refresh: bool = False,
) -> bool:
    """Can this host run the guest kernel under KVM?  Really boots it to find out.

    ``/dev/kvm`` existing is not enough (a ``kvm_pvm`` host hangs a stock kernel early), so
    the probe boots the initramfs with ``virtua.probe`` on the command line; its /init
    prints ``VIRTUA-PROBE-OK`` and powers off.  No marker within ``timeout`` seconds (hang,
    crash, MSR assertion...) means no KVM.  The answer is cached in
    ``cache_dir/kvm-probe.json`` keyed by kernel version + QEMU version + /dev/kvm identity.
    ``VIRTUA_ACCEL=kvm|tcg`` in the environment overrides the probe.
    """
    forced = os.environ.get("VIRTUA_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced == "kvm"
    from virtua.vmm import image

    cache = Path(cache_dir) if cache_dir else image.default_cache_dir()
    kernel = kernel or image.find_kernel()
    key = {
        "kernel": image.kernel_version(kernel),
        "qemu": qemu_version(),
        "kvm": _kvm_identity(),
    }
    cache_file = cache / "kvm-probe.json"
    if not refresh and cache_file.exists():
        try:
            entry = json.loads(cache_file.read_text())
            if entry.get("key") == key:
                return bool(entry["kvm"])
        except (ValueError, KeyError):
            pass
    ok = False
    detail = "no /dev/kvm access"
    if _kvm_usable():
        initrd = initrd or image.build_initramfs(cache, kernel)
        ok, detail = _boot_probe(kernel, initrd, timeout)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "kvm": ok, "detail": detail, "at": time.time()}))
    os.replace(tmp, cache_file)
    return ok


def _kvm_identity() -> str:
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return "absent"
    mods = ""
    try:
        mods = ",".join(
            sorted(
                line.split()[0]
                for line in Path("/proc/modules").read_text().splitlines()
                if line.startswith("kvm")
            )
        )
    except OSError:
        pass
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}:{mods}"


def _boot_probe(kernel: Path, initrd: Path, timeout: float) -> tuple[bool, str]:
    from virtua.vmm import image

    argv = [
        shutil.which(QEMU_BINARY) or QEMU_BINARY,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        "pc,accel=kvm",
        "-cpu",
        "host",
        "-m",
        "128",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 panic=-1 quiet virtua.probe",
        "-serial",
        "stdio",
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return False, f"no {image.PROBE_MARKER} within {timeout}s (guest hangs under KVM)"
    text = out.decode(errors="replace")
    if image.PROBE_MARKER in text:
        return True, "guest booted under KVM"
    return False, f"qemu exited {proc.returncode}: {text.strip()[-300:]}"


def select_accel(accel: str = "auto", **probe_kwargs: object) -> Literal["kvm", "tcg"]:
    """``auto`` -> probe (cached); ``kvm``/``tcg`` pass through."""
    if accel == "kvm":
        return "kvm"
    if accel == "tcg":
        return "tcg"
    if accel != "auto":
        raise InvalidArgument(f"accel must be auto, kvm or tcg, not {accel!r}")
    return "kvm" if probe_kvm(**probe_kwargs) else "tcg"  # type: ignore[arg-type]
