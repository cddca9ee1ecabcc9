"""`virtua serve` (and later the agent): long-running processes."""

from __future__ import annotations

import logging
import sys

import typer

from virtua.cli.main import State, app


@app.command("serve")
def serve_cmd(
    listen: str = typer.Option("127.0.0.1:10809", "--listen", help="NBD TCP address HOST:PORT ('' for none)"),
    socket: str | None = typer.Option(None, "--socket", help="NBD unix socket (default $VIRTUA_HOME/nbd.sock)"),
    tls: str = typer.Option("off", "--tls", help="off, on (offer STARTTLS) or require"),
    tls_cert: str | None = typer.Option(None, "--tls-cert", help="X.509 certificate (PEM)"),
    tls_key: str | None = typer.Option(None, "--tls-key", help="X.509 private key (PEM)"),
    tls_ca: str | None = typer.Option(None, "--tls-ca", help="CA to verify client certificates"),
    tls_psk: str | None = typer.Option(None, "--tls-psk", help="PSK file, username:hexkey lines (psktool format)"),
    allow: list[str] = typer.Option([], "--allow", help="EXPORT-GLOB=ID[,ID]: only these TLS identities may use matching exports"),
) -> None:
    """Serve every volume as NBD export POOL/VOL (snapshots read-only as POOL/VOL@SNAP) and the admin API."""
    import asyncio
    from pathlib import Path

    import uvloop

    from virtua.api.daemon import ServeConfig, parse_allow, serve
    from virtua.errors import InvalidArgument

    if tls not in ("off", "on", "require"):
        raise InvalidArgument(f"bad --tls {tls!r}: use off, on or require")
    if tls != "off" and not ((tls_cert and tls_key) or tls_psk):
        raise InvalidArgument("--tls on/require needs --tls-cert and --tls-key, or --tls-psk")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    cfg = ServeConfig(
        home=State.home,
        listen=listen or None,
        nbd_socket=Path(socket) if socket else None,
        tls=tls,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        tls_psk=tls_psk,
        allow=parse_allow(allow),
    )
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(cfg))
