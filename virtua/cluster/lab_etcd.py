"""A 3-member (or N-member) etcd cluster for `virtua lab up --etcd`: one real etcd member
in each lab host's namespace, TLS between everyone with virtua's etcd CA.

Each member listens on its host's lab address (client 2379, peer 2380) and on 127.0.0.1
inside its namespace; its data, log, certificate and pid file are in `$VIRTUA_HOME/lab/HOST/etcd`.
The manager (`virtua serve --etcd ...` in the root namespace, on the lab's bridge) reaches
every member with the client certificate in `$VIRTUA_HOME/pki/etcd/manager`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from pathlib import Path

from virtua.cluster.etcd_pki import client_context, client_credentials, etcd_ca, member_tls
from virtua.cluster.etcd_server import Member, start_member, wait_healthy
from virtua.net.lab import Lab
from virtua.procs import stop_process_group

log = logging.getLogger("virtua.lab")


def start(lab: Lab, home: Path, state_home: Path) -> list[Member]:
    """Start one member per lab host and wait until the cluster has a quorum. home: the
    lab's directory ($VIRTUA_HOME/lab); state_home: $VIRTUA_HOME (where the etcd CA is)."""
    ca = etcd_ca(state_home)
    members = [Member(h, lab.address(h), scheme="https") for h in lab.names()]
    token = uuid.uuid4().hex
    for m in members:
        d = home / m.name / "etcd"
        shutil.rmtree(d, ignore_errors=True)  # a new cluster: no member of an old one
        tls = member_tls(ca, m.name, [m.address], d / "tls")
        proc = start_member(m, members, d, token, netns=lab.ns(m.name), tls=tls)
        (d / "etcd.pid").write_text(str(proc.pid))
    context = client_context(client_credentials(state_home))
    for m in members:
        wait_healthy(m.client_url, timeout=60, context=context)
    return members


def stop(home: Path) -> None:
    """Stop the lab's members and remove their data (the next lab starts a new cluster)."""
    for pidfile in home.glob("h*/etcd/etcd.pid"):
        with contextlib.suppress(ValueError):
            stop_process_group(int(pidfile.read_text()), f"etcd member {pidfile.parent.parent.name}", log)
        shutil.rmtree(pidfile.parent, ignore_errors=True)


def urls(members: list[Member]) -> str:
    return ",".join(m.client_url for m in members)
