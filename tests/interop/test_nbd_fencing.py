"""Break F2 of the second adversarial pass, reproduced: NBD access followed placement only
when an export was opened, so a removed host, or the old host of a VM that moved or was
restarted elsewhere, kept its open session and went on writing: two writers on one disk.

The real NBD server with the cluster policy (virtua serve's --tls auto wiring) and a real
TLS client holding a host's certificate; the manager's records change under it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtua.api.ops import _refuse_if_open
from virtua.cluster.manager import Manager
from virtua.cluster.model import HostRecord, VMRecord
from virtua.cluster.store import SQLiteStore
from virtua.errors import Busy
from virtua.nbd import proto as P
from virtua.nbd.client import NBDClient, OptionError
from virtua.nbd.server import NBDServer
from virtua.nbd.tls import TLSConfig
from virtua.nbd.volumes import StorageExports
from virtua.pki.ca import ClusterCA
from virtua.pki.credentials import MANAGER, Credentials
from virtua.pki.files import write_private
from virtua.storage.service import Storage

pytestmark = pytest.mark.interop
DISK = "p/vc-n1"


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.ca = ClusterCA.ensure(tmp / "pki", manager_sans=["127.0.0.1"])
        self.storage = Storage(tmp / "home")
        self.storage.create_pool("p", capacity=64 << 20)
        self.storage.pool("p").create_volume("vc-n1", 4 << 20)
        self.manager = Manager(tmp, self.storage, SQLiteStore(tmp / "m.db"), authority=self.ca)
        self.manager.enforce_nbd_access = True
        for h in ("h1", "h2"):
            self.manager.store.put(f"/hosts/{h}", HostRecord(name=h, address=f"127.0.0.1:{len(h)}", cores=1,
                                                             memory_mb=512).model_dump())
        self.vm = VMRecord(vc="vc", name="n1", index=1, host="h1", state="running", address="10.9.0.2",
                           mac="52:54:00:00:00:01", tap="t1", disk=DISK, swap="p/vc-n1-swap", seed="p/vc-n1-seed")
        self.manager._put_vm(self.vm)
        # an administrator's rule: a backup tool's own export, nothing to do with placement
        self.storage.pool("p").create_volume("bk", 1 << 20)
        self.exports = exports = StorageExports(self.storage, {"p/bk": {"backup"}},
                                                host_access=self.manager.nbd_access)
        exports.holder_label = self.manager.disk_user
        self.manager.nbd_allowed = exports.allowed  # as serve wires it
        mcreds = self.ca.manager
        self.nbd = NBDServer(exports, tls=TLSConfig(str(mcreds.cert), str(mcreds.key), str(mcreds.ca)),
                             tls_mode="require", holders=self.storage.holders)
        self.tmp = tmp

    def host_context(self, name: str) -> ssl.SSLContext:
        cert, key = self.ca.issue("host", name, ["127.0.0.1"])
        c = Credentials(self.tmp / f"creds-{name}")
        c.dir.mkdir(mode=0o700)
        write_private(c.ca, self.ca.ca_pem)
        write_private(c.cert, cert)
        write_private(c.key, key)
        return c.client_context(MANAGER)


def open_disk(port: int, ctx: ssl.SSLContext) -> NBDClient:
    c = NBDClient.connect("127.0.0.1", port)
    c.hello()
    c.starttls(ctx, server_hostname="127.0.0.1")
    c.go(DISK)
    return c


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.storage.close()


async def _scenario(cluster: Cluster, change: str) -> None:
    await cluster.nbd.start(host="127.0.0.1", port=0)
    try:
        h1, h2 = cluster.host_context("h1"), cluster.host_context("h2")
        old = await asyncio.to_thread(open_disk, cluster.nbd.port, h1)
        await asyncio.to_thread(old.write, 0, b"A" * 4096, P.CMD_FLAG_FUA)  # control: h1 holds it now
        with pytest.raises(Busy, match=r"in use by VM vc/n1 on host h1 \(NBD client 127.0.0.1:\d+, TLS h1\)"):
            _refuse_if_open(cluster.storage, [DISK], "remove it", force=False)  # the VM, not just an address
        with pytest.raises(OptionError):  # control: h2 may not, while the VM is on h1
            await asyncio.to_thread(open_disk, cluster.nbd.port, h2)
        if change == "moved":
            cluster.manager._put_vm(cluster.vm.model_copy(update={"host": "h2", "state": "starting"}))
        elif change == "failed":
            cluster.manager._put_vm(cluster.vm.model_copy(update={"state": "failed"}))
        else:
            cluster.manager.remove_host("h1", force=True)
        await asyncio.sleep(0.1)
        with pytest.raises((ConnectionError, OSError)):
            await asyncio.to_thread(old.write, 0, b"B" * 4096, P.CMD_FLAG_FUA)
        dev = cluster.storage.open_export(DISK)
        assert dev is not None and bytes(dev.read(0, 4096)) == b"A" * 4096, "the old writer's write never landed"
        with pytest.raises(OptionError):
            await asyncio.to_thread(open_disk, cluster.nbd.port, h1)  # nor can it reconnect
        if change == "moved":  # the new host can
            new = await asyncio.to_thread(open_disk, cluster.nbd.port, h2)
            await asyncio.to_thread(new.write, 0, b"C" * 4096, P.CMD_FLAG_FUA)
            new.close()
        old.close()
    finally:
        await cluster.nbd.close()


@pytest.mark.parametrize("change", ["moved", "failed", "removed"])
def test_a_host_loses_its_open_disk_when_it_may_no_longer_hold_it(cluster: Cluster, change: str) -> None:
    asyncio.run(_scenario(cluster, change))


def test_a_host_cannot_tell_which_exports_exist(cluster: Cluster) -> None:
    """F5: the lookup came before the policy, so a refusal said whether the export existed."""

    async def go() -> None:
        await cluster.nbd.start(host="127.0.0.1", port=0)
        try:
            h2 = cluster.host_context("h2")

            def refusal(name: str) -> tuple[int, str]:
                c = NBDClient.connect("127.0.0.1", cluster.nbd.port)
                c.hello()
                c.starttls(h2, server_hostname="127.0.0.1")
                try:
                    with pytest.raises(OptionError) as e:
                        c.go(name)
                    return e.value.rep, str(e.value).replace(name, "NAME")
                finally:
                    c.close()

            exists, missing = await asyncio.to_thread(refusal, DISK), await asyncio.to_thread(refusal, "p/nope")
            assert exists == missing and exists[0] == P.REP_ERR_POLICY, (exists, missing)
        finally:
            await cluster.nbd.close()

    asyncio.run(go())


def test_a_saved_state_is_taken_only_while_the_manager_suspends_that_vm(cluster: Cluster) -> None:
    """A saved state is a QEMU migration stream another host loads: a host could send
    one at any time, to be fed to the next host on a drain or resume."""
    from virtua.errors import PermissionDenied

    with pytest.raises(PermissionDenied, match="only while suspending"):
        cluster.manager.save_state_upload("vc/n1")
    cluster.manager._state_uploads.add("vc/n1")  # what _suspend_vm does around the agent's call
    assert cluster.manager.save_state_upload("vc/n1") == cluster.manager.states_dir / "vc" / "n1.state"
    with pytest.raises(PermissionDenied):
        cluster.manager.save_state_upload("vc/n1")  # once


def test_fencing_looks_only_at_the_sessions_concerned_and_keeps_the_admins_rules(cluster: Cluster) -> None:
    """Review 3: fencing re-read every record for every holder on every record change
    (11 s of a stalled loop for one heartbeat of 1000 VMs), and closed sessions that an
    --allow rule grants."""

    async def go() -> None:
        await cluster.nbd.start(host="127.0.0.1", port=0)
        try:
            h1, backup = cluster.host_context("h1"), cluster.host_context("backup")
            old = await asyncio.to_thread(open_disk, cluster.nbd.port, h1)

            def open_bk() -> NBDClient:
                c = NBDClient.connect("127.0.0.1", cluster.nbd.port)
                c.hello()
                c.starttls(backup, server_hostname="127.0.0.1")
                c.go("p/bk")
                return c

            bk = await asyncio.to_thread(open_bk)
            checked: list[tuple[str, str]] = []
            real = cluster.manager.nbd_allowed

            def counting(export: str, identity: str) -> bool:
                checked.append((export, identity))
                return real(export, identity)

            cluster.manager.nbd_allowed = counting
            cluster.manager._put_vm(cluster.vm.model_copy(update={"host": "h2", "state": "starting"}))
            assert checked == [(DISK, "h1")], "one check: the one session on the VM's disks"
            cluster.manager.remove_host("h1", force=True)
            await asyncio.sleep(0.1)
            await asyncio.to_thread(bk.write, 0, b"K" * 4096, P.CMD_FLAG_FUA)  # the rule's session lives on
            with pytest.raises((ConnectionError, OSError)):
                await asyncio.to_thread(old.write, 0, b"B" * 4096, P.CMD_FLAG_FUA)
            bk.close()
            old.close()
        finally:
            await cluster.nbd.close()

    asyncio.run(go())


def test_a_stale_stopped_report_does_not_undo_a_start(cluster: Cluster) -> None:
    """Review 3: the agent's report of the instance before a start ("stopped") turned the
    starting record back, and the new QEMU's disk open was refused."""
    m = cluster.manager
    m._put_vm(cluster.vm.model_copy(update={"state": "starting"}))
    m.heartbeat("h1", [{"id": "vc/n1", "state": "stopped"}])
    m._last_beat.clear()  # the next beat, a second later
    assert m.vm_record("vc/n1").state == "starting"
    m._put_vm(cluster.vm.model_copy(update={"state": "running"}))
    m.heartbeat("h1", [{"id": "vc/n1", "state": "failed", "error": "QEMU exited"}])
    assert m.vm_record("vc/n1").state == "failed", "control: a running VM's death is taken"
    reply = m.heartbeat("h2", [{"id": "vc/n1", "state": "running"}])
    assert reply["stop"] == ["vc/n1"], "another host's instance is told to stop"


def test_a_hosts_answers_and_old_records_cannot_poison_the_records(cluster: Cluster) -> None:
    """Review 4: a start reply's "state" and "accel" went unchecked into the VM record, and
    from then on every listing and every heartbeat failed on it."""
    from virtua.cluster.manager import _started
    from virtua.errors import Unavailable

    with pytest.raises(Unavailable, match="answered the start with state 'pwned'"):
        _started({"state": "pwned"}, cluster.vm, None)
    assert _started({"state": "running", "accel": "tcg\x1b]0;x\x07"}, cluster.vm, "kvm") == ("running", "kvm")
    m = cluster.manager
    m.store.put("/vms/vc/bad", {"vc": "vc", "name": "bad", "state": "pwned"})  # damaged or from elsewhere
    assert [v.key for v in m.vms()] == ["vc/n1"], "the bad record is left out, the rest still listed"
    assert m.heartbeat("h1", [])["ok"]


def test_the_nbd_policy_reads_the_records_once_per_change(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 4: every export opened or listed re-read every record (13.8 s for one
    NBD_OPT_LIST with 1000 exports); fencing did so per session."""
    m = cluster.manager
    assert m.nbd_access(DISK, "h1")
    reads = []
    real = m.vms
    monkeypatch.setattr(m, "vms", lambda: reads.append(1) or real())
    for _ in range(1000):
        assert m.nbd_access(DISK, "h1") and not m.nbd_access(DISK, "h2")
    assert reads == [], "answered from the cache"
    m._put_vm(cluster.vm.model_copy(update={"host": "h2"}))
    assert m.nbd_access(DISK, "h2") and not m.nbd_access(DISK, "h1"), "a record change is seen at once"
    assert len(reads) == 1


def test_a_host_beating_too_fast_is_told_to_slow_down(cluster: Cluster) -> None:
    from virtua.errors import Busy

    m = cluster.manager
    assert m.heartbeat("h1", [])["ok"]
    with pytest.raises(Busy, match="at most every"):
        m.heartbeat("h1", [])


def test_addresses_from_before_get_one_spelling_and_ipv6_routes_lose_their_brackets(cluster: Cluster) -> None:
    m = cluster.manager
    m.store.put("/hosts/h3", HostRecord(name="h3", address="10.99.0.3\n:19003", cores=1, memory_mb=512).model_dump())
    m.store.put("/hosts/h6", HostRecord(name="h6", address="[fd00::6]:8781", cores=1, memory_mb=512).model_dump())
    m._canonical_addresses()
    assert m.host("h3").address == "10.99.0.3:19003"
    m._put_vm(cluster.vm.model_copy(update={"host": "h6"}))
    (route,) = m.network_for("h1")["routes"]
    assert route == {"dst": "10.9.0.2/32", "via": "fd00::6"}
