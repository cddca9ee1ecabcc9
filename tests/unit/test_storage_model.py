"""Property test: random operation sequences against a plain in-memory model.

Every volume and snapshot is compared byte for byte with the model after each step,
and `pool check` must be clean after every sequence (and across reopen).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from virtua.errors import DependencyError, NoSpace
from virtua.storage.pool import Pool
from virtua.storage.volume import SnapshotDevice, VolumeDevice

CHUNK = 4096
CAPACITY = 48 * CHUNK  # small, so ENOSPC happens too
SIZES = [8 * CHUNK, 16 * CHUNK + 1024, 100 * CHUNK]


class PoolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "pool"
        self.pool = Pool.create(self.path, "p", capacity=CAPACITY, chunk_size=CHUNK, overcommit=100)
        self.vols: dict[str, bytearray] = {}
        self.origin: dict[str, tuple[str, str] | None] = {}
        self.snaps: dict[tuple[str, str], bytes] = {}
        self.counter = 0

    def teardown(self) -> None:
        report = self.pool.check()
        self.pool.close()
        reopened = Pool(self.path)
        report2 = reopened.check()
        for name, data in self.vols.items():
            got = VolumeDevice(reopened, reopened.volume(name)).read(0, len(data))
            assert got == bytes(data), f"{name} differs after reopen"
        reopened.close()
        self.tmp.cleanup()
        assert report["ok"], report["problems"]
        assert report2["ok"], report2["problems"]

    def _new_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def dev(self, name: str) -> VolumeDevice:
        return VolumeDevice(self.pool, self.pool.volume(name))

    # ---------------------------------------------------------------- rules

    @rule(size=st.sampled_from(SIZES))
    def create(self, size: int) -> None:
        if len(self.vols) >= 5:
            return
        name = self._new_name("v")
        self.pool.create_volume(name, size)
        self.vols[name] = bytearray(size)
        self.origin[name] = None

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), fill=st.integers(1, 255), fua=st.booleans())
    def write(self, data: st.DataObject, fill: int, fua: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.vols)))
        size = len(self.vols[name])
        off = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, min(size - off, 5 * CHUNK)))
        payload = bytes([fill]) * length
        try:
            self.dev(name).write(off, payload, fua=fua)
        except NoSpace:
            return  # nothing may have changed: checked by the invariant
        self.vols[name][off : off + length] = payload

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), trim=st.booleans(), discard=st.booleans())
    def zero(self, data: st.DataObject, trim: bool, discard: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.vols)))
        size = len(self.vols[name])
        off = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, min(size - off, 6 * CHUNK)))
        try:
            if discard:
                self.dev(name).discard(off, length)
            else:
                self.dev(name).write_zeroes(off, length, may_trim=trim)
        except NoSpace:
            return
        self.vols[name][off : off + length] = bytes(length)

    @precondition(lambda self: self.vols)
    @rule(data=st.data())
    def snapshot(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.vols)))
        snap = self._new_name("s")
        self.pool.create_snapshot(name, snap)
        self.snaps[(name, snap)] = bytes(self.vols[name])

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), count=st.integers(1, 2))
    def clone(self, data: st.DataObject, count: int) -> None:
        if len(self.vols) >= 6:
            return
        vol, snap = data.draw(st.sampled_from(sorted(self.snaps)))
        new = self._new_name("c")
        made = self.pool.clone(vol, snap, new, count)
        for v in made:
            self.vols[v.name] = bytearray(self.snaps[(vol, snap)])
            self.origin[v.name] = (vol, snap)

    @precondition(lambda self: self.vols)
    @rule(data=st.data())
    def clone_implicit(self, data: st.DataObject) -> None:
        if len(self.vols) >= 6:
            return
        vol = data.draw(st.sampled_from(sorted(self.vols)))
        new = self._new_name("i")
        (made,) = self.pool.clone(vol, None, new)
        self.snaps[(vol, f"clone-{new}")] = bytes(self.vols[vol])
        self.vols[new] = bytearray(self.vols[vol])
        self.origin[new] = (vol, f"clone-{new}")

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        vol, snap = data.draw(st.sampled_from(sorted(self.snaps)))
        self.pool.rollback(vol, snap)
        self.vols[vol] = bytearray(self.snaps[(vol, snap)])

    @precondition(lambda self: any(o is not None for o in self.origin.values()))
    @rule(data=st.data())
    def reset(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, o in self.origin.items() if o)))
        origin = self.origin[name]
        assert origin is not None
        self.pool.reset(name)
        base = self.snaps[origin]
        size = max(len(self.vols[name]), len(base))
        self.vols[name] = bytearray(base) + bytearray(size - len(base))

    @precondition(lambda self: self.snaps and self.vols)
    @rule(data=st.data())
    def rebase(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.vols)))
        target = data.draw(st.sampled_from(sorted(self.snaps)))
        try:
            self.pool.rebase(name, target[0], target[1])
        except Exception as e:  # not a clone, has snapshots, or a snapshot of itself / a descendant: refused
            assert any(w in str(e) for w in ("rollback", "cycle", "not a clone", "has snapshot")), e
            return
        assert self.origin[name] is not None, "rebase of a volume that is not a clone must be refused"
        base = self.snaps[target]
        size = max(len(self.vols[name]), len(base))
        self.vols[name] = bytearray(base) + bytearray(size - len(base))
        self.origin[name] = target

    @precondition(lambda self: self.vols)
    @rule(data=st.data())
    def flatten(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.vols)))
        try:
            self.pool.flatten(name)
        except NoSpace:
            return
        self.origin[name] = None

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), grow=st.booleans())
    def resize(self, data: st.DataObject, grow: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.vols)))
        size = len(self.vols[name])
        new = size + 3 * CHUNK + 512 if grow else max(512, size - 2 * CHUNK - 512)
        try:
            self.pool.resize_volume(name, new, force=True)
        except NoSpace:
            return
        if grow:
            self.vols[name] += bytearray(new - size)
        else:
            del self.vols[name][new:]

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), recursive=st.booleans())
    def rm_volume(self, data: st.DataObject, recursive: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.vols)))
        try:
            self.pool.delete_volume(name, recursive=recursive)
        except DependencyError:
            assert not recursive
            assert any(v == name for v, _ in self.snaps)
            return
        self._forget_volume(name)

    def _forget_volume(self, name: str) -> None:
        del self.vols[name]
        del self.origin[name]
        for key in [k for k in self.snaps if k[0] == name]:
            self._forget_snapshot(key)

    def _forget_snapshot(self, key: tuple[str, str]) -> None:
        self.snaps.pop(key, None)
        for clone in [c for c, o in self.origin.items() if o == key]:
            if clone in self.vols:
                self._forget_volume(clone)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), recursive=st.booleans())
    def rm_snapshot(self, data: st.DataObject, recursive: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.snaps)))
        try:
            self.pool.delete_snapshot(key[0], key[1], recursive=recursive)
        except DependencyError:
            assert not recursive
            return
        self._forget_snapshot(key)

    @rule()
    def reopen(self) -> None:
        self.pool.close()
        self.pool = Pool(self.path)

    # ---------------------------------------------------------------- invariants

    @invariant()
    def contents_match(self) -> None:
        for name, data in self.vols.items():
            dev = self.dev(name)
            assert dev.size == len(data)
            assert dev.read(0, len(data)) == bytes(data), f"volume {name} differs"
            # unallocated extents must really read as zeros
            for ext in dev.block_status(0, len(data)):
                if ext.flags:
                    assert not any(data[ext.offset : ext.offset + ext.length]), name
        for (vol, snap), data in self.snaps.items():
            dev = SnapshotDevice(self.pool, self.pool.snapshot(vol, snap))
            assert dev.read(0, len(data)) == data, f"snapshot {vol}@{snap} differs"

    @invariant()
    def usage_consistent(self) -> None:
        assert 0 <= self.pool.used <= self.pool.capacity_chunks


TestPoolModel = PoolModel.TestCase
TestPoolModel.settings = settings(
    max_examples=int(os.environ.get("VIRTUA_MODEL_EXAMPLES", "60")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
