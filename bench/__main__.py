"""``python -m bench storage|nbd|vc|crash [options]``: run one benchmark suite."""

from __future__ import annotations

import importlib
import inspect
import sys

SUITES = {
    "storage": (
        "bench.storage_bench",
        "storage engine: clones, copy-on-write, depth, baseline, memory",
    ),
    "nbd": ("bench.nbd_bench", "NBD server"),
    "nbd-ab": ("bench.nbd_ab", "two NBD servers taking turns on one fio workload (A/B)"),
    "vc": ("bench.vc_bench", "virtual clusters: create + boot 1/4/8 nodes, disk space"),
    "crash": ("bench.crash_bench", "kill -9 the server at random points: bytes checked, violations"),
    "isolation": ("bench.isolation_bench", "fio on a guest's disk while admin operations run, against idle"),
    "ha": ("bench.ha_bench", "HA restart: kill, stop, partition of a host -> fenced, running elsewhere, instances"),
    "store": ("bench.store_bench", "vc create/info/destroy with the cluster state in SQLite vs 3-member etcd; etcd failover"),
    "io": ("bench.io_bench", "volume import/export, raw and qcow2, offline and via serve, vs qemu-img and nbdcopy"),
}


def usage() -> str:
    lines = [
        "usage: python -m bench SUITE [options]   (SUITE --help for its options)",
        "",
        "suites:",
    ]
    lines += [f"  {name:8} {desc}" for name, (_, desc) in SUITES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    suite = SUITES.get(argv[0])
    if suite is None:
        print(f"unknown suite {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(suite[0])
    # A suite's main takes argv, or (argparse style) reads sys.argv itself.
    if inspect.signature(module.main).parameters:
        return int(module.main(argv[1:]) or 0)
    sys.argv = [f"python -m bench {argv[0]}", *argv[1:]]
    return int(module.main() or 0)


if __name__ == "__main__":
    sys.exit(main())
