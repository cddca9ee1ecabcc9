"""Address planning for the routed private network of each virtual cluster.

Pure functions: no I/O. Each virtual cluster (VC) gets one IPv4 subnet out of a pool
(default ``10.200.0.0/16``). The network is routed, not bridged, and has no master
gateway: every host answers on the same gateway address for the VCs it runs.

Address convention inside a VC subnet
-------------------------------------
* the network address (``.0`` of a /24) and the broadcast address (last) are not used;
* the first host address (``.1``) is the gateway: every physical host configures it on
  its side of each VM's tap, so a VM always reaches "its" host at the same address
  wherever it runs and is migrated to;
* nodes get the addresses from the second host address (``.2``) up: node ``i``
  (0-based) has ``network + 2 + i``.

So a subnet of prefix ``p`` holds ``2 ** (32 - p) - 3`` nodes; /30 is the smallest
usable prefix (1 node), /24 holds 253, /16 65533.

Only RFC 1918 ranges (10/8, 172.16/12, 192.168/16) are accepted. A VC subnet may not
overlap another VC's subnet nor any network the hosts themselves use.

Egress
------
``egress`` says what a VC's guests reach beyond their own subnet: ``none`` (nothing),
``nat`` (other networks, masqueraded behind the address of the host a VM runs on) or
``routed`` (other networks, with the VMs' own addresses). In every mode the hosts are
closed to guests: ``host_filter_networks`` is what each host's filter keeps them from
(every host network, every host's and the manager's address).

Interface names
---------------
``tap_name(vc, i)`` is ``"vt" + 8 characters of base32(sha256(vc)) + str(i)``: at most
15 characters (Linux IFNAMSIZ - 1) for ``i < 100000``, unique within a VC (the hash
part has a fixed length) and, with 40 bits of hash, unique across VCs in practice.
``mac_for(vc, i)`` is ``02:hh:hh:hh:ii:ii``: locally administered unicast, three bytes
of sha256(vc) then the 16-bit index, so unique within a VC for ``i < 65536``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, collapse_addresses, ip_network
from typing import cast

from virtua.cluster.model import Egress
from virtua.errors import InvalidArgument, NoSpace
from virtua.net.hostnet import EGRESS_MODES

__all__ = [
    "DEFAULT_POOL",
    "EGRESS_MODES",
    "MAX_PREFIX",
    "PRIVATE_RANGES",
    "allocate_subnet",
    "capacity",
    "gateway_address",
    "host_filter_networks",
    "mac_for",
    "node_address",
    "prefix_for",
    "tap_name",
    "validate_egress",
    "validate_subnet",
]

DEFAULT_POOL = IPv4Network("10.200.0.0/16")
PRIVATE_RANGES = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
)
RESERVED_ADDRESSES = 3  # network, gateway (.1), broadcast
MAX_PREFIX = 30  # the smallest subnet that holds one node
IFNAMSIZ = 16
MAX_TAP_INDEX = 99_999
MAX_MAC_INDEX = 0xFFFF

Existing = Mapping[str, IPv4Network] | Iterable[IPv4Network]


def capacity(subnet: IPv4Network) -> int:
    """How many nodes fit in ``subnet`` (0 for /31 and /32)."""
    return max(0, subnet.num_addresses - RESERVED_ADDRESSES)


def prefix_for(nodes: int) -> int:
    """The longest prefix (smallest subnet) that holds ``nodes`` nodes."""
    if nodes < 1:
        raise InvalidArgument(f"a virtual cluster needs at least 1 node, not {nodes}")
    prefix = MAX_PREFIX
    while prefix > 0 and (1 << (32 - prefix)) - RESERVED_ADDRESSES < nodes:
        prefix -= 1
    if (1 << (32 - prefix)) - RESERVED_ADDRESSES < nodes:
        raise InvalidArgument(f"{nodes} nodes do not fit in any IPv4 subnet")
    return prefix


def gateway_address(subnet: IPv4Network) -> IPv4Address:
    """The address every host answers on for this VC (the first host address)."""
    if capacity(subnet) < 1:
        raise InvalidArgument(f"{subnet} is too small for a virtual cluster (needs /30 or larger)")
    return subnet.network_address + 1


def node_address(subnet: IPv4Network, index: int) -> IPv4Address:
    """The address of node ``index`` (0-based): ``network + 2 + index``."""
    cap = capacity(subnet)
    if not 0 <= index < cap:
        raise InvalidArgument(
            f"node index {index} out of range for {subnet}: it holds nodes 0..{cap - 1}"
            if cap
            else f"{subnet} is too small for a virtual cluster (needs /30 or larger)"
        )
    return subnet.network_address + 2 + index


def _net(value: IPv4Network | IPv4Interface | str) -> IPv4Network:
    """A network from a network, an interface address (192.168.1.10/24) or a string."""
    if isinstance(value, IPv4Interface):
        return value.network
    if isinstance(value, IPv4Network):
        return value
    return IPv4Network(value, strict=False)


def _named(existing: Existing) -> list[tuple[str | None, IPv4Network]]:
    if isinstance(existing, Mapping):
        return [(str(k), _net(v)) for k, v in existing.items()]
    return [(None, _net(n)) for n in existing]


def _is_private(net: IPv4Network) -> bool:
    return any(net.subnet_of(r) for r in PRIVATE_RANGES)


def allocate_subnet(
    existing: Existing,
    *,
    prefix: int,
    pool: IPv4Network = DEFAULT_POOL,
    host_networks: Iterable[IPv4Network | IPv4Interface] = (),
) -> IPv4Network:
    """The first subnet of ``prefix`` in ``pool`` (lowest address first) that overlaps no
    subnet in ``existing`` (other VCs: a name -> subnet mapping or a plain list) and no
    network in ``host_networks``.

    Raises :class:`InvalidArgument` for a bad prefix or a non-private pool and
    :class:`NoSpace` when the pool has no free subnet of that size.
    """
    pool = _net(pool)
    if not _is_private(pool):
        raise InvalidArgument(f"address pool {pool} is not a private (RFC 1918) range")
    if not pool.prefixlen <= prefix <= MAX_PREFIX:
        raise InvalidArgument(
            f"bad subnet prefix /{prefix} for pool {pool}: expected /{pool.prefixlen} to /{MAX_PREFIX}"
        )
    blocked = sorted(
        [n for _, n in _named(existing)] + [_net(n) for n in host_networks],
        key=lambda n: int(n.network_address),
    )
    size = 1 << (32 - prefix)
    start, end = int(pool.network_address), int(pool.broadcast_address)
    cand = start
    while cand + size - 1 <= end:
        last = cand + size - 1
        hit = [
            b
            for b in blocked
            if int(b.network_address) <= last and int(b.broadcast_address) >= cand
        ]
        if not hit:
            return IPv4Network((cand, prefix))
        # Jump past the furthest overlapping network, rounded up to the prefix boundary.
        past = max(int(b.broadcast_address) for b in hit) + 1
        cand = (past + size - 1) // size * size
    in_use = sum(1 for b in blocked if b.overlaps(pool))
    raise NoSpace(
        f"no free /{prefix} subnet left in {pool} "
        f"({in_use} overlapping subnet{'' if in_use == 1 else 's'} of virtual clusters or hosts)"
    )


def _parse_subnet(requested: IPv4Network | str) -> IPv4Network:
    if isinstance(requested, IPv4Network):
        return requested
    if not isinstance(requested, str):
        raise InvalidArgument(f"bad subnet {requested!r}: expected an IPv4 network")
    text = requested.strip()
    if "/" not in text:
        raise InvalidArgument(f"bad subnet {requested!r}: give a prefix length, e.g. {text}/24")
    try:
        net = ip_network(text)
    except ValueError as e:
        try:
            loose = ip_network(text, strict=False)
        except ValueError:
            raise InvalidArgument(f"bad subnet {requested!r}: {e}") from None
        raise InvalidArgument(
            f"bad subnet {requested!r}: host bits set; did you mean {loose}?"
        ) from None
    if not isinstance(net, IPv4Network):
        raise InvalidArgument(f"bad subnet {requested!r}: only IPv4 is supported")
    return net


def validate_subnet(
    requested: IPv4Network | str,
    existing: Existing,
    nodes: int,
    host_networks: Iterable[IPv4Network | IPv4Interface] = (),
) -> IPv4Network:
    """Check a subnet asked for by a user; return it as an :class:`IPv4Network`.

    ``existing`` holds the other VCs' subnets (a name -> subnet mapping names them in
    errors; leave out the VC's own subnet when re-validating it). Every problem found is
    reported in one :class:`InvalidArgument`.
    """
    if nodes < 1:
        raise InvalidArgument(f"a virtual cluster needs at least 1 node, not {nodes}")
    net = _parse_subnet(requested)

    problems: list[str] = []
    if not _is_private(net):
        problems.append("is not a private range (use 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16)")
    for h in map(_net, host_networks):
        if net.overlaps(h):
            problems.append(f"overlaps the hosts' network {h}")
    for name, other in _named(existing):
        if net.overlaps(other):
            owner = "another virtual cluster" if name is None else f"virtual cluster {name!r}"
            problems.append(f"overlaps {other} of {owner}")
    cap = capacity(net)
    if nodes > cap:
        problems.append(
            f"is too small: it holds {cap} node{'' if cap == 1 else 's'}, the virtual cluster "
            f"has {nodes} (use /{prefix_for(nodes)} or larger)"
        )
    if problems:
        raise InvalidArgument(f"subnet {net} " + "; ".join(problems))
    return net


def _vc_hash(vc_name: str) -> bytes:
    if not vc_name:
        raise InvalidArgument("virtual cluster name must not be empty")
    return hashlib.sha256(vc_name.encode()).digest()


def tap_name(vc_name: str, index: int) -> str:
    """The tap interface of node ``index`` of ``vc_name``: ``vt`` + 8 base32 chars + index."""
    if not 0 <= index <= MAX_TAP_INDEX:
        raise InvalidArgument(
            f"node index {index} out of range for a tap name (0..{MAX_TAP_INDEX})"
        )
    tag = base64.b32encode(_vc_hash(vc_name)[:5]).decode().lower()  # 40 bits -> 8 chars
    name = f"vt{tag}{index}"
    assert len(name) < IFNAMSIZ
    return name


def mac_for(vc_name: str, index: int) -> str:
    """Locally administered unicast MAC of node ``index``: ``02:hh:hh:hh:ii:ii``."""
    if not 0 <= index <= MAX_MAC_INDEX:
        raise InvalidArgument(f"node index {index} out of range for a MAC (0..{MAX_MAC_INDEX})")
    raw = bytes([0x02]) + _vc_hash(vc_name)[:3] + index.to_bytes(2, "big")
    return ":".join(f"{b:02x}" for b in raw)


def validate_egress(mode: str) -> Egress:
    """A VC's egress mode as given by a user: none, nat or routed."""
    if mode not in EGRESS_MODES:
        raise InvalidArgument(f"bad egress {mode!r}: use {', '.join(EGRESS_MODES)}")
    return cast(Egress, mode)


def host_filter_networks(
    networks: Iterable[IPv4Network | IPv4Interface | str], addresses: Iterable[str]
) -> list[str]:
    """What guests may never reach: the hosts' networks and each host's (and the
    manager's) own address, as few CIDRs as cover them. Loopback addresses are left out
    (a guest cannot send to them), as are unparsable ones (a hostname)."""
    nets: list[IPv4Network] = [_net(n) for n in networks]
    for a in addresses:
        try:
            addr = IPv4Address(a)
        except ValueError:
            continue
        if not addr.is_loopback and not addr.is_unspecified:
            nets.append(IPv4Network(addr))
    return [str(n) for n in collapse_addresses(nets)]
