"""`virtua serve` (and later the agent): long-running processes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from virtua.cli.main import State, app
from virtua.edge.limits import ConnectionLimits


@app.command("serve")
def serve_cmd(
    listen: str = typer.Option("127.0.0.1:10809", "--listen", help="NBD TCP address HOST:PORT ('' for none)"),
    socket: str | None = typer.Option(None, "--socket", help="NBD unix socket (default $VIRTUA_HOME/nbd.sock)"),
    tls: str = typer.Option("auto", "--tls", help="auto (the cluster CA: required on a non-loopback address, offered on loopback), off, on (offer STARTTLS) or require"),
    tls_cert: str | None = typer.Option(None, "--tls-cert", help="X.509 certificate (PEM)"),
    tls_key: str | None = typer.Option(None, "--tls-key", help="X.509 private key (PEM)"),
    tls_ca: str | None = typer.Option(None, "--tls-ca", help="CA to verify client certificates"),
    tls_psk: str | None = typer.Option(None, "--tls-psk", help="PSK file, username:hexkey lines (psktool format)"),
    allow: list[str] = typer.Option([], "--allow", help="EXPORT-GLOB=ID[,ID]: only these TLS identities may use matching exports"),
    api_listen: str = typer.Option("127.0.0.1:8780", "--api-listen", help="manager API for agents, HOST:PORT"),
    advertise: str | None = typer.Option(None, "--advertise", help="address agents and VMs use to reach this host (default: the API address)"),
    no_agent: bool = typer.Option(False, "--no-agent", help="do not start an agent for this machine"),
    agent_listen: str = typer.Option("127.0.0.1:8781", "--agent-listen", help="the local agent's address"),
    host_network: list[str] = typer.Option([], "--host-network", help="CIDR the hosts use (VC subnets never overlap it)"),
    handshake_timeout: float = typer.Option(
        ConnectionLimits.handshake_timeout, "--handshake-timeout",
        help="seconds a new connection (NBD or API) has to finish its handshake or send its request"),
    max_connections_per_source: int = typer.Option(
        ConnectionLimits.max_connections_per_source, "--max-connections-per-source",
        help="connections one address (or one local process) may hold, on each listener"),
    import_dir: str | None = typer.Option(
        None, "--import-dir", help="the only directory `template import` reads host files from (default $VIRTUA_HOME/import)",
    ),
    ca_cert: Path | None = typer.Option(None, "--ca-cert", help="use this cluster CA (PEM) instead of creating one (first start)"),
    ca_key: Path | None = typer.Option(None, "--ca-key", help="the supplied CA's key (PEM, unencrypted EC)"),
    lease_ttl: float = typer.Option(10.0, "--lease-ttl", help="seconds a host's lease lasts after its last heartbeat; "
                                    "its guests are killed by the host itself 3 s before, and restarted elsewhere after"),
    no_ha: bool = typer.Option(False, "--no-ha", help="never restart a lost host's VMs elsewhere (hosts then never "
                               "fence themselves: their guests ride out a manager outage)"),
    etcd: str | None = typer.Option(
        None, "--etcd", help="keep the cluster state (hosts, templates, VCs, VMs) in etcd at URL[,URL...] instead of manager.db"),
    etcd_prefix: str = typer.Option("/virtua/", "--etcd-prefix", help="the etcd key prefix of this cluster's state"),
    etcd_tls: Path | None = typer.Option(
        None, "--etcd-tls", help="for https:// etcd: the client credentials of virtua's etcd CA (default "
                                 "$VIRTUA_HOME/pki/etcd/manager, made by `virtua lab up --etcd`)"),
    etcd_max_txn_ops: int = typer.Option(
        128, "--etcd-max-txn-ops", help="the etcd cluster's --max-txn-ops (etcd's default 128; the members virtua "
        "starts: 2048): a VC of N nodes needs N + 1, and is refused before anything is made if it does not fit"),
) -> None:
    """Serve every volume as NBD export POOL/VOL (snapshots read-only as POOL/VOL@SNAP) and the admin API."""
    import asyncio

    import uvloop

    from virtua.api.daemon import ServeConfig, parse_allow, serve
    from virtua.errors import InvalidArgument, NotFound

    if tls not in ("auto", "off", "on", "require"):
        raise InvalidArgument(f"bad --tls {tls!r}: use auto, off, on or require")
    given = {"--tls-cert": tls_cert, "--tls-key": tls_key, "--tls-ca": tls_ca, "--tls-psk": tls_psk}
    for flag, path in given.items():
        if path is not None and not Path(path).is_file():
            raise NotFound(f"{flag} {path}: no such file")
    if tls in ("off", "auto") and any(given.values()):
        # auto uses the cluster CA's certificates; files of one's own need on or require
        flags = ", ".join(f for f, p in given.items() if p)
        raise InvalidArgument(f"{flags} given but --tls is {tls}: add --tls on (offer TLS) or --tls require")
    if tls in ("on", "require") and not ((tls_cert and tls_key) or tls_psk):
        raise InvalidArgument("--tls on/require needs --tls-cert and --tls-key, or --tls-psk")
    if not 4.0 <= lease_ttl <= 600.0:
        raise InvalidArgument(f"bad --lease-ttl {lease_ttl:g}: must be 4..600 seconds")
    _log_to_stderr()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = ServeConfig(
        lease_ttl=lease_ttl,
        ha=not no_ha,
        home=State.home,
        listen=listen or None,
        nbd_socket=Path(socket) if socket else None,
        tls=tls,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        tls_psk=tls_psk,
        allow=parse_allow(allow),
        api_listen=api_listen,
        advertise=advertise,
        local_agent=not no_agent,
        agent_listen=agent_listen,
        host_networks=host_network,
        handshake_timeout=handshake_timeout,
        max_connections_per_source=max_connections_per_source,
        import_dir=Path(import_dir).absolute() if import_dir else None,
        ca_cert=ca_cert,
        ca_key=ca_key,
        etcd=etcd or None,
        etcd_prefix=etcd_prefix,
        etcd_tls=etcd_tls,
        etcd_max_txn_ops=etcd_max_txn_ops,
    )
    if cfg.etcd:  # a bad URL is a one-line error before anything starts
        from virtua.cluster.store_etcd import parse_urls

        parse_urls(cfg.etcd)
    cfg.limits  # noqa: B018 - a bad limit is a one-line error before anything starts
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(cfg))


@app.command("agent")
def agent_cmd(
    manager: str = typer.Option("https://127.0.0.1:8780", "--manager", help="the manager's API URL"),
    join_token_file: Path | None = typer.Option(None, "--join-token-file", help="file holding a token from `virtua host join-token` (first start)"),
    listen: str = typer.Option("127.0.0.1:8781", "--listen", help="HOST:PORT for this agent's API (what the manager calls)"),
    name: str | None = typer.Option(None, "--name", help="host name (default: hostname)"),
    cores: int | None = typer.Option(None, "--cores", help="cores to offer (default: all)"),
    memory: str | None = typer.Option(None, "--memory", help="memory to offer, e.g. 8G (default: all)"),
    template: list[str] = typer.Option([], "--template", help="templates this host can run (default: any)"),
    accel: str = typer.Option("auto", "--accel", help="auto (probe KVM, fall back to TCG), kvm or tcg"),
    no_network: bool = typer.Option(False, "--no-network", help="no taps/routes (VMs without NICs)"),
    host_network: list[str] = typer.Option([], "--host-network", help="CIDR of this host's network"),
) -> None:
    """Run the agent of one physical host: registers with the manager and runs its VMs."""
    import asyncio

    import uvloop

    from virtua.cluster.agent import AgentConfig, default_name, run_agent
    from virtua.errors import InvalidArgument
    from virtua.units import parse_size

    if not manager.startswith("https://"):
        raise InvalidArgument(f"bad --manager {manager!r}: expected https://HOST:PORT (agents talk mTLS)")
    _log_to_stderr()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = AgentConfig(
        name=name or default_name(), listen=listen, manager=manager.rstrip("/"), home=State.home,
        templates=template or None, accel=accel, network=not no_network, host_networks=host_network,
        join_token_file=join_token_file,
    )
    if cores:
        cfg.cores = cores
    if memory:
        cfg.memory_mb = parse_size(memory) >> 20
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(run_agent(cfg))


def _log_to_stderr() -> None:
    """One line per message, whatever a peer's text holds (virtua.cli.render.OneLineFormatter)."""
    from virtua.cli.render import OneLineFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
