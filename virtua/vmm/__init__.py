"""Virtual machine manager: guest images, QEMU command lines, QEMU process control.

See docs/vmm.md.
"""

from virtua.vmm.agent import AgentResult, GuestAgent, GuestCommandError
from virtua.vmm.image import (
    GuestArtifacts,
    build_initramfs,
    build_rootfs,
    build_seed,
    default_cache_dir,
    ensure_artifacts,
    find_kernel,
    kernel_cmdline,
    read_seed,
)
from virtua.vmm.qemu import (
    DiskSpec,
    NicSpec,
    VMSpec,
    build_cmdline,
    parse_nbd_uri,
    probe_kvm,
    select_accel,
)
from virtua.vmm.vm import VMProcess, make_spec

__all__ = [
    "AgentResult",
    "DiskSpec",
    "GuestAgent",
    "GuestArtifacts",
    "GuestCommandError",
    "NicSpec",
    "VMProcess",
    "VMSpec",
    "build_cmdline",
    "build_initramfs",
    "build_rootfs",
    "build_seed",
    "default_cache_dir",
    "ensure_artifacts",
    "find_kernel",
    "kernel_cmdline",
    "make_spec",
    "parse_nbd_uri",
    "probe_kvm",
    "read_seed",
    "select_accel",
]
