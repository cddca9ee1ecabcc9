"""Run an NBD server from the command line.

    python -m virtua.nbd --dir /srv/images --port 10809 [--unix /run/nbd.sock]
                         [--tls off|on|require --tls-cert C --tls-key K --tls-ca CA --tls-psk F]
                         [--provider pkg.module:factory --provider-arg ARG]

Prints ``NBD_READY port=<port> unix=<path>`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys
from typing import Any

from virtua.edge.limits import ConnectionLimits
from virtua.errors import VirtuaError
from virtua.nbd.exports import DirectoryProvider
from virtua.nbd.server import NBDServer
from virtua.nbd.tls import TLSConfig


def _load_provider(args: argparse.Namespace) -> Any:
    if args.provider:
        mod, _, attr = args.provider.partition(":")
        factory = getattr(importlib.import_module(mod), attr or "provider")
        return factory(args.provider_arg) if args.provider_arg is not None else factory()
    if not args.dir:
        raise SystemExit("give --dir or --provider")
    return DirectoryProvider(args.dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m virtua.nbd", description="virtua NBD server")
    p.add_argument("--dir", help="export every regular file in this directory")
    p.add_argument("--provider", help="module:factory returning an ExportProvider")
    p.add_argument("--provider-arg", help="argument passed to the provider factory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=10809, help="TCP port (0 = pick one)")
    p.add_argument("--no-tcp", action="store_true", help="listen only on --unix")
    p.add_argument("--unix", help="also listen on this unix socket")
    p.add_argument("--tls", choices=["off", "on", "require"], default="off")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca", help="CA to verify client certificates (identity = CN)")
    p.add_argument("--tls-psk", help="PSK key file (username:hexkey lines)")
    p.add_argument("--max-connections", type=int, default=ConnectionLimits.max_connections)
    p.add_argument("--max-connections-per-source", type=int, default=ConnectionLimits.max_connections_per_source,
                   help="connections one address (or one local process) may hold")
    p.add_argument("--handshake-timeout", type=float, default=ConnectionLimits.handshake_timeout,
                   help="seconds a new connection has to finish the handshake")
    p.add_argument(
        "--sparse-reads",
        choices=["auto", "on", "off"],
        default="auto",
        help="answer structured reads of holes with OFFSET_HOLE (auto: per device)",
    )
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


async def _run(args: argparse.Namespace) -> None:
    provider = _load_provider(args)
    tls = None
    if args.tls != "off":
        tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_ca, args.tls_psk)
    sparse = {"auto": None, "on": True, "off": False}[args.sparse_reads]
    server = NBDServer(
        provider,
        tls=tls,
        tls_mode=args.tls,
        max_connections=args.max_connections,
        max_connections_per_source=args.max_connections_per_source,
        handshake_timeout=args.handshake_timeout,
        sparse_reads=sparse,
    )
    await server.start(
        host=None if args.no_tcp else args.host,
        port=None if args.no_tcp else args.port,
        unix_path=args.unix,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.close()))
    print(f"NBD_READY port={server.port} unix={args.unix}", flush=True)
    await server.serve_forever()
    close = getattr(provider, "close", None)
    if close is not None:
        close()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.no_uvloop:
            asyncio.run(_run(args))
        else:
            import uvloop

            uvloop.run(_run(args))
    except VirtuaError as e:  # a bad limit, say: one line, not a traceback
        raise SystemExit(f"python -m virtua.nbd: error: {e.message}") from None


if __name__ == "__main__":
    main()
