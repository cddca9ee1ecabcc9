"""Adversarial: the pool model with a check after every step, and the
ownership invariant (a head never owns a chunk another volume or a snapshot reads)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from tests.unit.test_storage_model import CHUNK, PoolModel
from virtua.errors import DependencyError, NoSpace
from virtua.storage.volume import SnapshotDevice


class OwnershipModel(PoolModel):
    @precondition(lambda self: self.vols)
    @rule(data=st.data(), fill=st.integers(1, 255), drop=st.integers(0, 3), mode=st.integers(0, 2))
    def churn(self, data: st.DataObject, fill: int, drop: int, mode: int) -> None:
        """Snapshot, change a little (write, zero or trim), remove an older snapshot: the
        export's pattern, where the head goes down."""
        name = data.draw(st.sampled_from(sorted(self.vols)))
        snap = self._new_name("t")
        self.pool.create_snapshot(name, snap)
        self.snaps[(name, snap)] = bytes(self.vols[name])
        size = len(self.vols[name])
        off = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, min(size - off, 2 * CHUNK)))
        try:
            if mode == 0:
                self.dev(name).write(off, bytes([fill]) * length)
                self.vols[name][off : off + length] = bytes([fill]) * length
            else:
                self.dev(name).write_zeroes(off, length, may_trim=mode == 2)
                self.vols[name][off : off + length] = bytes(length)
        except NoSpace:
            pass
        own = sorted(k for k in self.snaps if k[0] == name)
        if own:
            key = (name, snap) if drop < 2 else own[drop % len(own)]
            try:
                self.pool.delete_snapshot(*key)
            except DependencyError:
                return
            self._forget_snapshot(key)

    @invariant()
    def heads_own_only_private_chunks(self) -> None:
        pool = self.pool
        readers: dict[int, set[str]] = {}
        for v in pool.volumes.values():
            m = pool.volume_map(v)
            for _, p in m.items():
                if p > 0:
                    readers.setdefault(p, set()).add(f"vol:{v.name}")
        for s in pool.snapshots.values():
            m = pool.frozen_map(s.layer)
            assert m is not None
            for _, p in m.items():
                if p > 0:
                    readers.setdefault(p, set()).add(f"snap:{s.id}")
        heads = {v.layer: v.name for v in pool.volumes.values()}
        for p, who in readers.items():
            o = pool.owner[p]
            assert o != 0, f"chunk {p} read by {who} is free"
            if o in heads:
                assert who == {f"vol:{heads[o]}"}, f"head of {heads[o]} owns chunk {p} shared with {who}"

    @invariant()
    def check_clean(self) -> None:
        report = self.pool.check()
        assert report["ok"], report["problems"]


_ = SnapshotDevice
TestOwnershipModel = OwnershipModel.TestCase
TestOwnershipModel.settings = settings(
    max_examples=int(os.environ.get("VIRTUA_MODEL_EXAMPLES", "150")),
    stateful_step_count=int(os.environ.get("VIRTUA_MODEL_STEPS", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
