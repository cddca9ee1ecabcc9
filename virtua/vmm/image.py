"""Guest artifacts built only from Debian packages already on the host.

* kernel    -- the newest ``/boot/vmlinuz-*-cloud-amd64`` (any ``/boot/vmlinuz-*`` otherwise)
* initramfs -- busybox-static + the virtio/ext4 modules of that kernel (dependencies resolved
  with ``modules.dep``) + an ``/init`` that mounts ``root=/dev/vdX`` and ``switch_root``s,
  or stays in the initramfs when no ``root=`` is given.
* rootfs    -- an ext4 image (``mkfs.ext4 -d``) holding a busybox root filesystem whose
  ``/sbin/init`` does first-boot configuration from a *seed* disk.
* seed      -- a raw disk image: a magic first line, shell-quoted ``KEY='value'`` lines, NUL
  padding.  Busybox reads it with ``dd | tr -d '\\000'``.

Everything is content addressed: each builder hashes its inputs (kernel version, busybox
binary, module files, scripts, builder version) and skips the work when the stamp matches.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from virtua.errors import InvalidArgument, Unavailable

BUILDER_VERSION = "1"

SEED_MAGIC = "#virtua-seed v1"
SEED_SIZE = 64 * 1024

READY_MARKER = "VIRTUA-READY"
PROBE_MARKER = "VIRTUA-PROBE-OK"

# Modules the guest needs.  Built-in ones (ext4 on the Debian cloud kernel) are skipped.
GUEST_MODULES = [
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "crc32c_generic",
    "ext4",
    "button",
    "evdev",
]


def default_cache_dir() -> Path:
    env = os.environ.get("VIRTUA_CACHE_DIR")
    if env:
        return Path(env) / "vmm"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "virtua" / "vmm"


def _require(tool: str) -> str:
    path = shutil.which(tool) or next(
        (
            p
            for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
            if os.access(p := f"{d}/{tool}", os.X_OK)
        ),
        None,
    )
    if not path:
        raise Unavailable(f"required tool {tool!r} not found (install the Debian package)")
    return path


# ---------------------------------------------------------------------------------------
# kernel


def _version_key(v: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.\-+~]", v)]


def find_kernel(boot: Path = Path("/boot")) -> Path:
    """Newest ``vmlinuz-*-cloud-amd64``; falls back to any ``vmlinuz-*``."""
    for pattern in ("vmlinuz-*-cloud-amd64", "vmlinuz-*"):
        found = sorted(boot.glob(pattern), key=lambda p: _version_key(kernel_version(p)))
        if found:
            return found[-1]
    raise Unavailable(f"no kernel found in {boot} (install linux-image-cloud-amd64)")


def kernel_version(kernel: Path) -> str:
    return kernel.name.removeprefix("vmlinuz-")


def modules_dir(kernel: Path) -> Path:
    d = Path("/lib/modules") / kernel_version(kernel)
    if not (d / "modules.dep").exists():
        raise Unavailable(f"no modules for kernel {kernel_version(kernel)} in {d}")
    return d


# ---------------------------------------------------------------------------------------
# module dependency resolution


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def resolve_modules(moddir: Path, wanted: list[str]) -> list[str]:
    """Relative paths of ``wanted`` modules and all their dependencies, in load order.

    Modules built into the kernel (``modules.builtin``) are dropped; soft pre-dependencies
    (``modules.softdep``) are honoured when they are loadable modules.
    """
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        name = _modname(mod)
        paths[name] = mod
        deps[name] = [_modname(d) for d in rest.split()]
    builtin = {
        _modname(line.strip())
        for line in (moddir / "modules.builtin").read_text().splitlines()
        if line.strip()
    }
    softpre: dict[str, list[str]] = {}
    softdep = moddir / "modules.softdep"
    if softdep.exists():
        for line in softdep.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "softdep":
                name = parts[1].replace("-", "_")
                pre: list[str] = []
                mode = None
                for p in parts[2:]:
                    if p in ("pre:", "post:"):
                        mode = p
                    elif mode == "pre:":
                        pre.append(p.replace("-", "_"))
                softpre[name] = pre

    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, required: bool) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name in builtin:
            return
        if name not in paths:
            if required:
                raise Unavailable(f"kernel module {name!r} not found in {moddir}")
            return
        for s in softpre.get(name, []):
            visit(s, False)
        for d in deps[name]:
            visit(d, True)
        order.append(paths[name])

    for w in wanted:
        visit(w, True)
    return order


# ---------------------------------------------------------------------------------------
# cpio (newc) writer -- lets us create /dev/console without being root


class _Cpio:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (
                self.ino,
                mode,
                0,
                0,
                1,
                0,
                len(data),
                0,
                0,
                rdev[0],
                rdev[1],
                len(nameb),
                0,
            )
        )
        self.ino += 1
        self.buf.write(hdr.encode() + nameb)
        self.buf.write(b"\0" * ((-(110 + len(nameb))) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * ((-len(data)) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * ((-len(data)) % 512)


# ---------------------------------------------------------------------------------------
# scripts

INITRAMFS_INIT = r"""#!/bin/sh
# virtua initramfs /init
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do
  [ -n "$m" ] && insmod "/lib/modules/$m" 2>/dev/null
done < /etc/virtua-modules
root=""; rootfstype=ext4; rootflags=rw; probe=""; rootwait=10
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${arg#root=}" ;;
    rootfstype=*) rootfstype="${arg#rootfstype=}" ;;
    rootflags=*) rootflags="${arg#rootflags=}" ;;
    virtua.rootwait=*) rootwait="${arg#virtua.rootwait=}" ;;
    virtua.probe) probe=1 ;;
  esac
done
if [ -n "$probe" ]; then
  echo "VIRTUA-PROBE-OK"
  poweroff -f
fi
if [ -n "$root" ]; then
  i=0
  while [ ! -b "$root" ] && [ "$i" -lt $((rootwait * 10)) ]; do usleep 100000; i=$((i + 1)); done
  mkdir -p /newroot
  if mount -t "$rootfstype" -o "$rootflags" "$root" /newroot; then
    if [ -x /newroot/sbin/init ]; then
      for d in dev proc sys; do mkdir -p "/newroot/$d"; mount --move "/$d" "/newroot/$d"; done
      exec switch_root /newroot /sbin/init
    fi
    echo "VIRTUA-ERROR no /sbin/init on $root"
    umount /newroot
  else
    echo "VIRTUA-ERROR cannot mount root $root ($rootfstype)"
  fi
fi
hostname initramfs
mkdir -p /etc/acpi/PWRF /var/log /var/run
printf '#!/bin/sh\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod 755 /etc/acpi/PWRF/00000080
acpid -c /etc/acpi 2>/dev/null
echo "VIRTUA-READY hostname=initramfs ip=none"
while :; do setsid cttyhack sh -l; sleep 1; done
"""

# /sbin/init of the rootfs.  PID 1 is a shell: it backgrounds everything long-running and
# then sleeps in `wait`, so trapped signals (busybox poweroff/reboot send USR2/TERM to
# PID 1) run promptly.
ROOTFS_INIT = r"""#!/bin/sh
# virtua rootfs /sbin/init: first-boot configuration from the seed disk
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
umask 022
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw / 2>/dev/null

log() { echo "virtua-init: $*"; }

shutdown_now() {
  log "shutting down ($1)"
  swapoff -a 2>/dev/null
  sync
  umount -a -r 2>/dev/null
  mount -o remount,ro / 2>/dev/null
  sync
  if [ "$1" = reboot ]; then reboot -f; else poweroff -f; fi
}
trap 'shutdown_now poweroff' USR2 TERM
trap 'shutdown_now reboot' INT

# --- seed ---------------------------------------------------------------------------
SEED_DEV=""
for d in /dev/vd? /dev/vd??; do
  [ -b "$d" ] || continue
  if [ "$(dd if="$d" bs=15 count=1 2>/dev/null)" = "#virtua-seed v1" ]; then SEED_DEV="$d"; break; fi
done
VIRTUA_HOSTNAME=virtua; VIRTUA_IP=""; VIRTUA_GATEWAY=""; VIRTUA_VC=""; VIRTUA_NODE_INDEX=""
VIRTUA_SSH_KEY=""; VIRTUA_SWAP=/dev/vdb; VIRTUA_IFACE=eth0; VIRTUA_RUN=""; VIRTUA_DNS=""
if [ -n "$SEED_DEV" ]; then
  dd if="$SEED_DEV" bs=4096 count=16 2>/dev/null | tr -d '\000' > /run/virtua-seed
  . /run/virtua-seed
  log "seed from $SEED_DEV"
else
  log "no seed disk found"
fi

hostname "$VIRTUA_HOSTNAME"
echo "$VIRTUA_HOSTNAME" > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$VIRTUA_HOSTNAME" > /etc/hosts
[ -n "$VIRTUA_DNS" ] && echo "nameserver $VIRTUA_DNS" > /etc/resolv.conf
if [ -n "$VIRTUA_SSH_KEY" ]; then
  mkdir -p /root/.ssh && chmod 700 /root/.ssh
  echo "$VIRTUA_SSH_KEY" > /root/.ssh/authorized_keys
  chmod 600 /root/.ssh/authorized_keys
fi

# --- network ------------------------------------------------------------------------
ip link set lo up
ip_shown=none
if [ -n "$VIRTUA_IP" ] && [ -e "/sys/class/net/$VIRTUA_IFACE" ]; then
  ip link set "$VIRTUA_IFACE" up
  case "$VIRTUA_IP" in */*) cidr="$VIRTUA_IP" ;; *) cidr="$VIRTUA_IP/24" ;; esac
  ip addr add "$cidr" dev "$VIRTUA_IFACE"
  [ -n "$VIRTUA_GATEWAY" ] && ip route add default via "$VIRTUA_GATEWAY"
  ip_shown="${cidr%/*}"
elif [ -e "/sys/class/net/$VIRTUA_IFACE" ]; then
  ip link set "$VIRTUA_IFACE" up
fi

# --- swap (mkswap only once: on a blank disk) ----------------------------------------
if [ -n "$VIRTUA_SWAP" ] && [ "$VIRTUA_SWAP" != none ] && [ -b "$VIRTUA_SWAP" ] \
   && [ "$VIRTUA_SWAP" != "$SEED_DEV" ]; then
  if ! swapon "$VIRTUA_SWAP" 2>/dev/null; then
    if [ "$(dd if="$VIRTUA_SWAP" bs=4096 count=1 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]; then
      mkswap "$VIRTUA_SWAP" >/dev/null && swapon "$VIRTUA_SWAP" && log "swap created on $VIRTUA_SWAP"
    else
      log "not touching $VIRTUA_SWAP: not blank and not swap"
    fi
  fi
fi

# --- ACPI power button -> clean poweroff ---------------------------------------------
acpid -c /etc/acpi 2>/dev/null

# --- agent on the second serial port (see virtua/vmm/agent.py) -----------------------
if [ -c /dev/ttyS1 ]; then
  setsid /sbin/virtua-agent /dev/ttyS1 </dev/null >/dev/null 2>&1 &
fi

[ -x /etc/virtua/rc.local ] && /etc/virtua/rc.local
if [ -n "$VIRTUA_RUN" ]; then
  ( sh -c "$VIRTUA_RUN" </dev/null >/dev/console 2>&1 & )
fi

echo "VIRTUA-READY hostname=$VIRTUA_HOSTNAME ip=$ip_shown"

# --- console shell (respawned) --------------------------------------------------------
(
  while :; do
    setsid cttyhack sh -l
    sleep 1
  done
) </dev/console >/dev/console 2>&1 &

while :; do
  sleep 3600 &
  wait $!
done
"""

# The agent: a line protocol on a raw serial port.  Request: "<id> <base64 script>\n".
# Response: "VXO <id> <rc> <base64 output>\n".  Output is combined stdout+stderr.
AGENT_SCRIPT = r"""#!/bin/sh
# virtua guest agent: runs base64-encoded scripts received on a serial port
tty="${1:-/dev/ttyS1}"
dir="${VIRTUA_AGENT_DIR:-/run}"
stty -F "$tty" raw -echo 2>/dev/null
exec 3<>"$tty"
printf 'VXO hello 0 \n' >&3
while :; do
  if ! read -r id payload <&3; then sleep 1; continue; fi
  id=$(printf '%s' "$id" | tr -cd 'A-Za-z0-9_-')
  [ -n "$id" ] || continue
  printf '%s' "$payload" | tr -d '\r' | base64 -d > "$dir/agent.cmd" 2>/dev/null
  sh "$dir/agent.cmd" </dev/null >"$dir/agent.out" 2>&1
  rc=$?
  printf 'VXO %s %s ' "$id" "$rc" >&3
  base64 "$dir/agent.out" | tr -d '\n' >&3
  printf '\n' >&3
done
"""

ACPI_POWER = """#!/bin/sh
kill -USR2 1
"""

PROFILE = r"""export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PS1='\h:\w# '
"""


# ---------------------------------------------------------------------------------------
# helpers


def _busybox() -> Path:
    p = Path(_require("busybox")).resolve()
    # must be the static one: the guest has no libc
    out = (
        subprocess.run(["file", "-b", str(p)], capture_output=True, text=True)
        if shutil.which("file")
        else None
    )
    if out and "dynamically linked" in out.stdout:
        raise Unavailable(f"{p} is dynamically linked; install busybox-static")
    return p


def _busybox_applets(bb: Path) -> list[str]:
    out = subprocess.run([str(bb), "--list-full"], capture_output=True, text=True, check=True)
    return [a for a in out.stdout.split() if a and a != "linuxrc"]


def _file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# initramfs


def build_initramfs(out_dir: Path, kernel: Path | None = None) -> Path:
    """Build (or reuse) ``out_dir/initramfs-<hash>.cpio.gz`` for ``kernel``."""
    kernel = kernel or find_kernel()
    moddir = modules_dir(kernel)
    bb = _busybox()
    mods = resolve_modules(moddir, GUEST_MODULES)
    h = hashlib.sha256()
    for part in (BUILDER_VERSION, kernel_version(kernel), _file_digest(bb), INITRAMFS_INIT):
        h.update(part.encode() + b"\0")
    for m in mods:
        st = (moddir / m).stat()
        h.update(f"{m}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    out = Path(out_dir) / f"initramfs-{h.hexdigest()[:16]}.cpio.gz"
    if out.exists():
        return out

    c = _Cpio()
    for d in (
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "etc",
        "newroot",
        "lib",
        "lib/modules",
        "tmp",
        "run",
        "root",
    ):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.chardev("dev/ttyS0", 4, 64)
    c.file("bin/busybox", bb.read_bytes(), 0o755)
    for applet in _busybox_applets(bb):
        if applet in ("bin/busybox",):
            continue
        c.symlink(applet, os.path.relpath("bin/busybox", os.path.dirname(applet)))
    names = []
    for m in mods:
        src = moddir / m
        data = src.read_bytes()
        if m.endswith(".xz"):
            import lzma

            data = lzma.decompress(data)
        name = _modname(m) + ".ko"
        c.file(f"lib/modules/{name}", data)
        names.append(name)
    c.file("etc/virtua-modules", ("\n".join(names) + "\n").encode())
    c.file("init", INITRAMFS_INIT.encode(), 0o755)
    raw = c.finish()
    _atomic_write(out, gzip.compress(raw, compresslevel=6, mtime=0))
    return out


# ---------------------------------------------------------------------------------------
# rootfs


def _rootfs_tree(root: Path, bb: Path) -> None:
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "etc/acpi/PWRF",
        "etc/virtua",
        "root",
        "tmp",
        "run",
        "var/log",
        "mnt",
        "data",
        "home",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    shutil.copy2(bb, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    for applet in _busybox_applets(bb):
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "bin/busybox", link.parent))
    files = {
        "sbin/init": (ROOTFS_INIT, 0o755),
        "sbin/virtua-agent": (AGENT_SCRIPT, 0o755),
        "etc/acpi/PWRF/00000080": (ACPI_POWER, 0o755),
        "etc/profile": (PROFILE, 0o644),
        "etc/passwd": ("root:x:0:0:root:/root:/bin/sh\n", 0o644),
        "etc/group": ("root:x:0:\n", 0o644),
        "etc/shadow": ("root::0:0:99999:7:::\n", 0o600),
        "etc/fstab": ("/dev/vda / ext4 rw 0 1\n", 0o644),
        "etc/virtua/release": (f"virtua-guest builder={BUILDER_VERSION}\n", 0o644),
    }
    for rel, (text, mode) in files.items():
        p = root / rel
        if p.is_symlink():
            p.unlink()
        p.write_text(text)
        p.chmod(mode)


def rootfs_digest() -> str:
    bb = _busybox()
    h = hashlib.sha256()
    for part in (BUILDER_VERSION, _file_digest(bb), ROOTFS_INIT, AGENT_SCRIPT, ACPI_POWER, PROFILE):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def build_rootfs(out_path: Path, size: int = 64 * 1024 * 1024) -> Path:
    """Build an ext4 image at ``out_path`` (skipped when ``out_path.stamp`` matches)."""
    out_path = Path(out_path)
    if size < 8 * 1024 * 1024 or size % 4096:
        raise InvalidArgument("rootfs size must be >= 8 MiB and a multiple of 4096")
    mkfs = _require("mkfs.ext4")
    bb = _busybox()
    stamp = out_path.with_name(out_path.name + ".stamp")
    key = json.dumps({"digest": rootfs_digest(), "size": size})
    if out_path.exists() and stamp.exists() and stamp.read_text() == key:
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="virtua-rootfs-") as td:
        tree = Path(td) / "root"
        tree.mkdir()
        _rootfs_tree(tree, bb)
        tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        with tmp.open("wb") as f:
            f.truncate(size)
        r = subprocess.run(
            [
                mkfs,
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                "virtua-root",
                "-E",
                "root_owner=0:0",
                "-O",
                "^metadata_csum_seed",
                "-d",
                str(tree),
                str(tmp),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "E2FSPROGS_FAKE_TIME": "1"},
        )
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise Unavailable(f"mkfs.ext4 failed: {r.stderr.strip()}")
        os.replace(tmp, out_path)
    stamp.write_text(key)
    return out_path


# ---------------------------------------------------------------------------------------
# seed


_SEED_KEY = re.compile(r"[a-z][a-z0-9_]*", re.ASCII)  # fullmatch: `$` passes a trailing newline


def seed_text(**config: object) -> str:
    lines = [SEED_MAGIC]
    for k, v in config.items():
        if v is None:
            continue
        if not _SEED_KEY.fullmatch(k):
            raise InvalidArgument(f"bad seed key {k!r}")
        s = str(v)
        if "\0" in s:
            raise InvalidArgument(f"seed value for {k!r} contains NUL")
        lines.append(f"VIRTUA_{k.upper()}={shlex.quote(s)}")
    return "\n".join(lines) + "\n"


def build_seed(
    out_path: Path,
    *,
    hostname: str,
    ip: str | None = None,
    gateway: str | None = None,
    vc: str | None = None,
    node_index: int | None = None,
    ssh_key: str | None = None,
    swap: str | None = None,
    run: str | None = None,
    dns: str | None = None,
    **extra: object,
) -> Path:
    """Write a raw seed disk: magic line, ``VIRTUA_KEY='value'`` lines, NUL padding.

    ``swap`` names the swap device (default ``/dev/vdb``; ``"none"`` disables it);
    ``run`` is a shell command started in the background after boot.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", hostname):
        raise InvalidArgument(f"bad hostname {hostname!r}")
    text = seed_text(
        hostname=hostname,
        ip=ip,
        gateway=gateway,
        vc=vc,
        node_index=node_index,
        ssh_key=ssh_key,
        swap=swap,
        run=run,
        dns=dns,
        **extra,
    ).encode()
    if len(text) >= SEED_SIZE:
        raise InvalidArgument("seed too large")
    _atomic_write(Path(out_path), text + b"\0" * (SEED_SIZE - len(text)))
    return Path(out_path)


def read_seed(path: Path) -> dict[str, str]:
    """Parse a seed disk written by :func:`build_seed` (keys lower-case, without prefix)."""
    data = Path(path).read_bytes()[:SEED_SIZE].split(b"\0", 1)[0].decode()
    lines = data.splitlines()
    if not lines or lines[0] != SEED_MAGIC:
        raise InvalidArgument(f"{path} is not a virtua seed")
    out: dict[str, str] = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        k, _, v = line.partition("=")
        parsed = shlex.split(v)
        out[k.removeprefix("VIRTUA_").lower()] = parsed[0] if parsed else ""
    return out


# ---------------------------------------------------------------------------------------
# all together


@dataclass(frozen=True)
class GuestArtifacts:
    kernel: Path
    initrd: Path
    rootfs: Path

    @property
    def kernel_version(self) -> str:
        return kernel_version(self.kernel)


def ensure_artifacts(
    cache_dir: Path | None = None, rootfs_size: int = 64 * 1024 * 1024
) -> GuestArtifacts:
    """Kernel + initramfs + pristine rootfs image in ``cache_dir`` (built once)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    kernel = find_kernel()
    initrd = build_initramfs(cache, kernel)
    rootfs = build_rootfs(cache / f"rootfs-{rootfs_digest()}.ext4", rootfs_size)
    return GuestArtifacts(kernel=kernel, initrd=initrd, rootfs=rootfs)


def kernel_cmdline(root: str | None = "/dev/vda", *, extra: str = "", quiet: bool = True) -> str:
    parts = ["console=ttyS0,115200", "panic=-1", "i8042.noaux", "i8042.nokbd", "tsc=reliable"]
    if quiet:
        parts.append("quiet")
    if root:
        parts += [f"root={root}", "rw"]
    if extra:
        parts.append(extra)
    return " ".join(parts)
