"""A random workload over several volumes of one pool, through the real NBD server and the
real operations, killed with SIGKILL at random moments; after each restart every byte of
every volume and snapshot is checked against a model of what may be there.

The model: every 512-byte sector written carries its writer's volume id, its own sector
number and a generation number unique to the write (`sector_bytes`), so any sector read
back names where it came from. Per volume and sector it keeps the generation that is
durable (last flushed, FUA-acknowledged, or fixed by a snapshot) and the set of those
written since (acknowledged or only sent). After a crash a sector must hold the durable
one or one of the newer ones (0 is zeros: trims and zeroes are writes of generation 0);
anything else is a violation: `foreign` if it is data of a volume this one never derived
from, `lost` if it is this volume's own older or unknown data.

Used by tests/unit/test_storage_crash.py (20 kill points) and `./run bench crash` (200+).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.crash_server import CrashServer, OpError, ServeCrashServer
from virtua.nbd import proto as P
from virtua.nbd.client import NBDClient
from virtua.storage.service import Storage

SECTOR = 512
POOL = "crash"


def sector_bytes(vid: int, sector: int, gen: int) -> bytes:
    if gen == 0:
        return bytes(SECTOR)
    unit = f"<V{vid:05d}S{sector:08d}G{gen:010d}>".encode().ljust(32, b".")
    return unit * (SECTOR // 32)


def parse_sector(data: bytes) -> tuple[int, int, int] | None:
    """(vid, sector, gen) of a sector written by sector_bytes; (0, 0, 0) for zeros."""
    if data == bytes(SECTOR):
        return 0, 0, 0
    unit = data[:32]
    if data != unit * (SECTOR // 32) or not unit.startswith(b"<V"):
        return None
    try:
        return int(unit[2:7]), int(unit[8:16]), int(unit[17:27])
    except ValueError:
        return None


@dataclass
class ModelVolume:
    vid: int
    name: str
    sectors: int
    lineage: set[int]  # volume ids whose data this one may hold (itself, its origins)
    durable: list[int] = field(default_factory=list)
    current: list[int] = field(default_factory=list)
    newer: dict[int, set[int]] = field(default_factory=dict)  # sector -> gens since durable
    snapshots: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.durable:
            self.durable = [0] * self.sectors
        if not self.current:
            self.current = list(self.durable)

    def flushed(self) -> None:
        self.durable = list(self.current)
        self.newer.clear()


@dataclass
class Stats:
    kill_points: int = 0
    ops: int = 0
    bytes_checked: int = 0
    violations: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


class CrashWorkload:
    """One pool, several volumes, a model; `kill_point()` runs, kills, restarts, checks."""

    def __init__(
        self, home: Path, seed: int, *, volume_size: int = 1 << 20, chunk_size: int = 16384,
        max_volumes: int = 6, window: tuple[float, float] = (0.05, 0.6), serve: bool = False,
    ) -> None:
        self.home = home
        self.rng = random.Random(seed)
        self.volume_size = volume_size
        self.max_volumes = max_volumes
        self.window = window
        self.gen = 0
        self.writer: dict[int, int] = {}  # gen -> writer vid
        self.next_vid = 1
        self.vols: dict[str, ModelVolume] = {}
        self.uncertain: list[tuple[str, Any]] = []  # operations a kill may have cut short
        self.stats = Stats()
        st = Storage(home)
        st.create_pool(POOL, capacity=512 << 20, chunk_size=chunk_size)
        st.close()
        self.server = (ServeCrashServer(home) if serve else CrashServer(home)).start()
        self.clients: dict[str, NBDClient] = {}
        for _ in range(3):
            self._create_volume()

    # ---------------------------------------------------------------- the workload

    def _client(self, name: str) -> NBDClient:
        c = self.clients.get(name)
        if c is None:
            c = self.clients[name] = NBDClient.connect(port=self.server.port).open(f"{POOL}/{name}")
        return c

    def _new_gen(self, vid: int) -> int:
        self.gen += 1
        self.writer[self.gen] = vid
        return self.gen

    def _create_volume(self) -> None:
        vid = self.next_vid
        self.next_vid += 1
        name = f"v{vid}"
        mv = ModelVolume(vid, name, self.volume_size // SECTOR, {vid})
        self.uncertain.append(("create", mv))
        self.server.call("volume.create", ref=f"{POOL}/{name}", size=self.volume_size)
        self.uncertain.pop()
        self.vols[name] = mv

    def _write(self, mv: ModelVolume, kind: str) -> None:
        c = self._client(mv.name)
        first = self.rng.randrange(mv.sectors)
        count = min(self.rng.choice([1, 8, 8, 32, 64, 128, 300]), mv.sectors - first)
        fua = self.rng.random() < 0.15
        gen = 0 if kind != "write" else self._new_gen(mv.vid)
        for s in range(first, first + count):
            mv.newer.setdefault(s, set()).add(gen)
        flags = P.CMD_FLAG_FUA if fua else 0
        if kind == "write":
            data = b"".join(sector_bytes(mv.vid, s, gen) for s in range(first, first + count))
            c.write(first * SECTOR, data, flags)
        elif kind == "zero":
            if self.rng.random() < 0.3:
                flags |= P.CMD_FLAG_NO_HOLE
            c.write_zeroes(first * SECTOR, count * SECTOR, flags)
        else:
            c.trim(first * SECTOR, count * SECTOR, flags)
        for s in range(first, first + count):
            mv.current[s] = gen
            if fua:  # this write is durable; later ones join newer again
                mv.durable[s] = gen
                mv.newer.pop(s, None)

    def _flush(self, mv: ModelVolume) -> None:
        self._client(mv.name).flush()
        mv.flushed()

    def _snapshot(self, mv: ModelVolume) -> None:
        name = f"s{self._new_gen(0)}"
        content = list(mv.current)
        self.uncertain.append(("snapshot", (mv, name, content)))
        self.server.call("snapshot.create", ref=f"{POOL}/{mv.name}@{name}")
        self.uncertain.pop()
        mv.snapshots[name] = content
        mv.flushed()  # a snapshot flushes first: it is durable, and so is what it froze

    def _clone(self, mv: ModelVolume) -> None:
        if not mv.snapshots or len(self.vols) >= self.max_volumes:
            return
        snap = self.rng.choice(sorted(mv.snapshots))
        vid = self.next_vid
        self.next_vid += 1
        content = mv.snapshots[snap]
        clone = ModelVolume(vid, f"v{vid}", len(content), {vid} | mv.lineage, list(content))
        self.uncertain.append(("create", clone))
        self.server.call("clone", source=f"{POOL}/{mv.name}@{snap}", new=f"{POOL}/{clone.name}")
        self.uncertain.pop()
        self.vols[clone.name] = clone

    def _remove(self, mv: ModelVolume, what: str) -> None:
        if what == "snapshot.rm":
            if not mv.snapshots:
                return
            snap = self.rng.choice(sorted(mv.snapshots))
            self.uncertain.append(("snapshot.rm", (mv, snap)))
            self.server.call("snapshot.rm", ref=f"{POOL}/{mv.name}@{snap}", recursive=True, force=True)
            del mv.snapshots[snap]
        else:
            if len(self.vols) <= 2:
                return
            self.uncertain.append(("volume.rm", mv))
            self.server.call("volume.rm", ref=f"{POOL}/{mv.name}", recursive=True, force=True)
            self.vols.pop(mv.name)
        self._forget_missing()  # the clones a recursive removal took along
        self.uncertain.pop()

    def _flatten(self, mv: ModelVolume) -> None:
        # force: the workload's own clients hold its volumes open (an admin's --force;
        # virtua serve refuses otherwise, the lean crash server keeps no holders)
        self.server.call("volume.flatten", ref=f"{POOL}/{mv.name}", force=True)  # content unchanged

    def _forget_missing(self) -> None:
        """Drop model volumes the server no longer has (clones of removed snapshots)."""
        have = {v["name"].split("/", 1)[1] for v in self.server.call("volume.list", pool=POOL)}
        for name in list(self.vols):
            if name not in have:
                self.vols.pop(name)
                c = self.clients.pop(name, None)
                if c is not None:
                    c.close()

    def step(self) -> None:
        self.stats.ops += 1
        if len(self.vols) < 2:  # a recursive removal may take clones along
            self._create_volume()
            return
        mv = self.vols[self.rng.choice(sorted(self.vols))]
        r = self.rng.random()
        if r < 0.45:
            self._write(mv, "write")
        elif r < 0.53:
            self._write(mv, "zero")
        elif r < 0.61:
            self._write(mv, "trim")
        elif r < 0.75:
            self._flush(mv)
        elif r < 0.81:
            self._snapshot(mv)
        elif r < 0.86:
            self._clone(mv)
        elif r < 0.89:
            self._remove(mv, "snapshot.rm")
        elif r < 0.92:
            self._remove(mv, "volume.rm")
        elif r < 0.96:
            if len(self.vols) < self.max_volumes:
                self._create_volume()
        else:
            self._flatten(mv)

    # ---------------------------------------------------------------- kill and check

    def kill_point(self) -> None:
        """Run the workload until a SIGKILL at a random moment, restart, check everything."""
        pid = self.server.pid()
        delay = self.rng.uniform(*self.window)
        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

        timer = threading.Timer(delay, kill)
        timer.start()
        deadline = time.monotonic() + delay + 30
        try:
            while time.monotonic() < deadline:
                self.step()
        except (OSError, ConnectionError, EOFError):
            pass  # the kill
        except OpError as e:
            timer.cancel()
            raise AssertionError(f"operation refused under the workload: {e}") from e
        timer.join()
        self.stats.kill_points += 1
        for c in self.clients.values():
            c.close()
        self.clients.clear()
        self.server.kill()
        self.server.start()
        self._check()

    def _violation(self, kind: str, what: str) -> None:
        self.stats.count(kind)
        if len(self.stats.violations) < 50:
            self.stats.violations.append(f"kill point {self.stats.kill_points}: {kind}: {what}")

    def _resolve_uncertain(self, have: set[str]) -> None:
        for kind, what in self.uncertain:
            if kind == "create":
                if what.name in have:
                    self.vols[what.name] = what
            elif kind == "volume.rm":
                self._drop_gone(have)
            elif kind == "snapshot":
                mv, name, content = what
                snaps = self._snapshots_on_server(mv)
                if name in snaps:
                    mv.snapshots[name] = content
            elif kind == "snapshot.rm":
                mv, name = what
                if name not in self._snapshots_on_server(mv):
                    mv.snapshots.pop(name, None)
                self._drop_gone(have)
        self.uncertain.clear()

    def _drop_gone(self, have: set[str]) -> None:
        """A recursive removal a kill cut short: the volumes it took along may be gone."""
        for name in list(self.vols):
            if name not in have:
                self.vols.pop(name)

    def _snapshots_on_server(self, mv: ModelVolume) -> set[str]:
        try:
            return {s["name"].rsplit("@", 1)[1] for s in self.server.call("snapshot.list", ref=f"{POOL}/{mv.name}")}
        except OpError:
            return set()

    def _check(self) -> None:
        report = self.server.call("pool.check", name=POOL)
        if not report["ok"]:
            self._violation("check", "; ".join(report["problems"]))
        have = {v["name"].split("/", 1)[1] for v in self.server.call("volume.list", pool=POOL)}
        self._resolve_uncertain(have)
        for name in sorted(set(self.vols) | have):
            if name not in have:
                self._violation("lost", f"volume {name} is gone")
                self.vols.pop(name)
            elif name not in self.vols:
                self._violation("foreign", f"volume {name} appeared")
        for mv in list(self.vols.values()):
            server_snaps = self._snapshots_on_server(mv)
            for sname in sorted(set(mv.snapshots) | server_snaps):
                if sname not in server_snaps:
                    self._violation("lost", f"snapshot {mv.name}@{sname} is gone")
                    mv.snapshots.pop(sname)
                elif sname not in mv.snapshots:
                    self._violation("foreign", f"snapshot {mv.name}@{sname} appeared")
                else:
                    self._check_device(mv, f"{mv.name}@{sname}", [{g} for g in mv.snapshots[sname]])
            allowed = [{mv.durable[s]} | mv.newer.get(s, set()) for s in range(mv.sectors)]
            observed = self._check_device(mv, mv.name, allowed)
            # a restart is the new baseline: what is there now is what the disk holds
            mv.durable = observed
            mv.current = list(observed)
            mv.newer.clear()

    def _check_device(self, mv: ModelVolume, export: str, allowed: list[set[int]]) -> list[int]:
        c = NBDClient.connect(port=self.server.port).open(f"{POOL}/{export}")
        data = b""
        step = 256 << 10
        for off in range(0, len(allowed) * SECTOR, step):
            data += c.read(off, min(step, len(allowed) * SECTOR - off))
        c.close()
        self.stats.bytes_checked += len(data)
        observed: list[int] = []
        for s, ok in enumerate(allowed):
            got = data[s * SECTOR : (s + 1) * SECTOR]
            parsed = parse_sector(got)
            gen = parsed[2] if parsed is not None else -1
            observed.append(max(gen, 0))
            if parsed is not None and gen in ok and (
                gen == 0 or (parsed[0] == self.writer.get(gen) and parsed[1] == s)
            ):
                continue
            if parsed is None:
                self._violation("garbage", f"{export} sector {s}: {got[:40]!r}")
            elif parsed[0] not in mv.lineage and gen != 0:
                self._violation("foreign", f"{export} sector {s} holds volume {parsed[0]}'s data (gen {gen})")
            else:
                self._violation("lost", f"{export} sector {s}: gen {gen}, allowed {sorted(ok)[:6]}")
        return observed

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.server.kill()
