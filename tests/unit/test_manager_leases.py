"""A restarted manager judges a host it has not heard from yet by its own monotonic clock:
the host has a lease from the manager's start. It used to judge by the wall-clock time of
the host's record, so a clock stepped forward (or a record from before a long stop) made a
live host offline at once, and its VMs were restarted beside the running ones (found by
the adversarial pass: last_seen moved back an hour, the agent stopped, serve started)."""

from __future__ import annotations

import time
from pathlib import Path

from virtua.cluster.manager import Manager
from virtua.cluster.store import SQLiteStore
from virtua.storage.service import Storage


def test_a_host_not_heard_from_since_the_start_has_a_lease_from_the_start(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "home")
    store = SQLiteStore(tmp_path / "manager.db")
    try:
        first = Manager(tmp_path, storage, store, lease_ttl=1.0)
        first.register_host({"name": "h1", "address": "10.0.0.11:8781", "cores": 2, "memory_mb": 2048})
        record = store.get("/hosts/h1")
        assert record is not None
        store.put("/hosts/h1", {**record, "last_seen": time.time() - 3600})  # an hour ago, by the wall clock
        restarted = Manager(tmp_path, storage, store, lease_ttl=1.0)  # has heard nothing from h1
        assert restarted._leased(restarted.host("h1")), "a lease from the manager's start, not from the record"
        time.sleep(1.1)
        assert not restarted._leased(restarted.host("h1")), "silent for a whole lease since the start: lost"
    finally:
        store.close()
        storage.close()
