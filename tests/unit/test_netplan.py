"""Address planning for the per-VC routed private networks."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtua.cluster.model import Egress
from virtua.cluster.netplan import (
    DEFAULT_POOL,
    EGRESS_MODES,
    allocate_subnet,
    capacity,
    gateway_address,
    host_filter_networks,
    mac_for,
    node_address,
    prefix_for,
    tap_name,
    validate_egress,
    validate_subnet,
)
from virtua.errors import InvalidArgument, NoSpace

N = IPv4Network


# --- sizes and addresses ------------------------------------------------------------


@pytest.mark.parametrize(
    "nodes, prefix",
    [(1, 30), (2, 29), (5, 29), (6, 28), (13, 28), (14, 27), (29, 27), (30, 26),
     (253, 24), (254, 23), (65533, 16), (65534, 15)],
)  # fmt: skip
def test_prefix_for(nodes: int, prefix: int) -> None:
    assert prefix_for(nodes) == prefix
    assert capacity(N(f"10.0.0.0/{prefix}")) >= nodes
    if prefix < 30:
        assert capacity(N(f"10.0.0.0/{prefix + 1}")) < nodes


@pytest.mark.parametrize("nodes", [0, -1])
def test_prefix_for_rejects_empty_vc(nodes: int) -> None:
    with pytest.raises(InvalidArgument, match="at least 1 node"):
        prefix_for(nodes)


@pytest.mark.parametrize(
    "subnet, index, address",
    [
        ("10.200.0.0/24", 0, "10.200.0.2"),
        ("10.200.0.0/24", 252, "10.200.0.254"),
        ("10.200.3.0/30", 0, "10.200.3.2"),
        ("10.200.0.0/23", 254, "10.200.1.0"),
        ("172.16.0.64/26", 10, "172.16.0.76"),
    ],
)
def test_node_address(subnet: str, index: int, address: str) -> None:
    assert node_address(N(subnet), index) == IPv4Address(address)


@pytest.mark.parametrize(
    "subnet, index, message",
    [
        (
            "10.200.0.0/24",
            253,
            r"node index 253 out of range for 10.200.0.0/24: it holds nodes 0..252",
        ),
        ("10.200.0.0/24", -1, r"node index -1 out of range"),
        ("10.200.0.0/30", 1, r"it holds nodes 0..0"),
        ("10.200.0.0/31", 0, r"too small"),
    ],
)
def test_node_address_out_of_range(subnet: str, index: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        node_address(N(subnet), index)


def test_gateway_is_first_host_address_and_not_a_node() -> None:
    net = N("10.200.7.0/24")
    assert gateway_address(net) == IPv4Address("10.200.7.1")
    nodes = {node_address(net, i) for i in range(capacity(net))}
    assert gateway_address(net) not in nodes
    assert net.network_address not in nodes and net.broadcast_address not in nodes
    assert len(nodes) == 253
    with pytest.raises(InvalidArgument):
        gateway_address(N("10.200.7.0/31"))


# --- allocation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "existing, hosts, prefix, expected",
    [
        ([], [], 24, "10.200.0.0/24"),
        ([N("10.200.0.0/24")], [], 24, "10.200.1.0/24"),
        ({"a": N("10.200.0.0/24"), "b": N("10.200.1.0/24")}, [], 24, "10.200.2.0/24"),
        # a hole left by a deleted VC is reused
        ({"a": N("10.200.0.0/24"), "c": N("10.200.2.0/24")}, [], 24, "10.200.1.0/24"),
        # a smaller existing subnet still blocks the whole /24 that contains it
        ([N("10.200.0.64/26")], [], 24, "10.200.1.0/24"),
        # ... but not a /26 next to it
        ([N("10.200.0.64/26")], [], 26, "10.200.0.0/26"),
        ([N("10.200.0.0/26")], [], 26, "10.200.0.64/26"),
        # a bigger existing subnet is skipped in one step
        ([N("10.200.0.0/20")], [], 24, "10.200.16.0/24"),
        # the hosts' networks are never used, as networks or as interface addresses
        ([], [N("10.200.0.0/23")], 24, "10.200.2.0/24"),
        ([], [IPv4Interface("10.200.0.17/24")], 24, "10.200.1.0/24"),
        ([N("10.200.0.0/24")], [N("10.200.1.0/24"), N("192.168.1.0/24")], 24, "10.200.2.0/24"),
        # networks outside the pool do not matter
        ([N("10.1.0.0/16")], [N("10.0.0.0/16")], 28, "10.200.0.0/28"),
        # prefix as big as the pool
        ([], [], 16, "10.200.0.0/16"),
    ],
)
def test_allocate_subnet(
    existing: list[IPv4Network] | dict[str, IPv4Network],
    hosts: list[IPv4Network],
    prefix: int,
    expected: str,
) -> None:
    got = allocate_subnet(existing, prefix=prefix, host_networks=hosts)
    assert got == N(expected)
    # and it passes validation
    validate_subnet(got, existing, capacity(got), hosts)


def test_allocate_subnet_other_pool() -> None:
    pool = N("192.168.100.0/24")
    used = [N("192.168.100.0/28"), N("192.168.100.16/28")]
    assert allocate_subnet(used, prefix=28, pool=pool) == N("192.168.100.32/28")


@pytest.mark.parametrize(
    "existing, hosts, prefix, pool, error, message",
    [
        ([], [N("10.0.0.0/8")], 24, DEFAULT_POOL, NoSpace,
         r"no free /24 subnet left in 10.200.0.0/16 \(1 overlapping subnet of virtual clusters or hosts\)"),
        ([N("192.168.5.0/25"), N("192.168.5.128/25")], [], 26, N("192.168.5.0/24"), NoSpace,
         r"no free /26 subnet left in 192.168.5.0/24 \(2 overlapping subnets"),
        ([N("10.200.0.0/17")], [], 16, DEFAULT_POOL, NoSpace, r"no free /16"),
        ([], [], 15, DEFAULT_POOL, InvalidArgument, r"bad subnet prefix /15 for pool 10.200.0.0/16: expected /16 to /30"),
        ([], [], 31, DEFAULT_POOL, InvalidArgument, r"bad subnet prefix /31"),
        ([], [], 24, N("8.8.0.0/16"), InvalidArgument, r"address pool 8.8.0.0/16 is not a private"),
    ],
)  # fmt: skip
def test_allocate_subnet_errors(
    existing: list[IPv4Network],
    hosts: list[IPv4Network],
    prefix: int,
    pool: IPv4Network,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        allocate_subnet(existing, prefix=prefix, pool=pool, host_networks=hosts)


@settings(max_examples=200, deadline=None)
@given(
    used=st.lists(
        st.tuples(st.integers(0, 255), st.integers(20, 30)).map(
            lambda t: IPv4Network((0x0AC80000 + t[0] * 256, t[1]), strict=False)
        ),
        max_size=12,
    ),
    prefix=st.integers(22, 30),
    split=st.integers(0, 12),
)
def test_allocate_matches_naive_first_fit(used: list[IPv4Network], prefix: int, split: int) -> None:
    pool = N("10.200.0.0/20")
    existing, hosts = used[:split], used[split:]
    naive = next(
        (c for c in pool.subnets(new_prefix=prefix) if not any(c.overlaps(u) for u in used)),
        None,
    )
    if naive is None:
        with pytest.raises(NoSpace):
            allocate_subnet(existing, prefix=prefix, pool=pool, host_networks=hosts)
    else:
        assert allocate_subnet(existing, prefix=prefix, pool=pool, host_networks=hosts) == naive


# --- validation ---------------------------------------------------------------------

VCS = {"alpha": N("10.200.0.0/24"), "beta": N("10.200.1.0/25")}
HOSTS = [N("192.168.10.0/24")]


@pytest.mark.parametrize(
    "requested, nodes, message",
    [
        ("10.200.0.128/25", 4,
         "subnet 10.200.0.128/25 overlaps 10.200.0.0/24 of virtual cluster 'alpha'"),
        ("10.200.0.0/16", 4,
         "subnet 10.200.0.0/16 overlaps 10.200.0.0/24 of virtual cluster 'alpha'; "
         "overlaps 10.200.1.0/25 of virtual cluster 'beta'"),
        ("192.168.10.64/26", 4, "subnet 192.168.10.64/26 overlaps the hosts' network 192.168.10.0/24"),
        ("10.200.2.0/29", 8,
         "subnet 10.200.2.0/29 is too small: it holds 5 nodes, the virtual cluster has 8 "
         "(use /28 or larger)"),
        ("10.200.2.0/31", 1,
         "subnet 10.200.2.0/31 is too small: it holds 0 nodes, the virtual cluster has 1 "
         "(use /30 or larger)"),
        ("10.200.2.0/30", 2,
         "subnet 10.200.2.0/30 is too small: it holds 1 node, the virtual cluster has 2 "
         "(use /29 or larger)"),
        ("8.8.8.0/24", 4,
         "subnet 8.8.8.0/24 is not a private range (use 10.0.0.0/8, 172.16.0.0/12 or "
         "192.168.0.0/16)"),
        ("100.64.0.0/24", 4,
         "subnet 100.64.0.0/24 is not a private range (use 10.0.0.0/8, 172.16.0.0/12 or "
         "192.168.0.0/16)"),
        ("172.32.0.0/24", 4,
         "subnet 172.32.0.0/24 is not a private range (use 10.0.0.0/8, 172.16.0.0/12 or "
         "192.168.0.0/16)"),
        # every problem at once
        ("10.200.1.0/30", 3,
         "subnet 10.200.1.0/30 overlaps 10.200.1.0/25 of virtual cluster 'beta'; is too small: "
         "it holds 1 node, the virtual cluster has 3 (use /29 or larger)"),
        ("10.200.0.5/24", 4, "bad subnet '10.200.0.5/24': host bits set; did you mean 10.200.0.0/24?"),
        ("10.200.0.0", 4, "bad subnet '10.200.0.0': give a prefix length, e.g. 10.200.0.0/24"),
        ("10.300.0.0/24", 4, "bad subnet '10.300.0.0/24'"),
        ("fd00::/64", 4, "bad subnet 'fd00::/64': only IPv4 is supported"),
    ],
)  # fmt: skip
def test_validate_subnet_errors(requested: str, nodes: int, message: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_subnet(requested, VCS, nodes, HOSTS)
    assert exc.value.message.startswith(message)
    if not message.startswith("bad subnet"):
        assert exc.value.message == message


def test_validate_subnet_unnamed_existing() -> None:
    with pytest.raises(InvalidArgument, match="overlaps 10.200.0.0/24 of another virtual cluster"):
        validate_subnet("10.200.0.0/26", [N("10.200.0.0/24")], 2)


@pytest.mark.parametrize(
    "requested, nodes",
    [("10.200.2.0/24", 253), ("10.200.1.128/25", 125), (N("172.16.5.0/28"), 13),
     ("192.168.11.0/30", 1), (" 10.201.0.0/16 ", 1000)],
)  # fmt: skip
def test_validate_subnet_ok(requested: str | IPv4Network, nodes: int) -> None:
    net = validate_subnet(requested, VCS, nodes, HOSTS)
    assert isinstance(net, IPv4Network)
    assert net == N(str(requested).strip())


def test_validate_subnet_rejects_empty_vc() -> None:
    with pytest.raises(InvalidArgument, match="at least 1 node"):
        validate_subnet("10.200.2.0/24", VCS, 0, HOSTS)


# --- tap names and MACs -------------------------------------------------------------

VC_NAMES = ["a", "vc1", "vc2", "a-rather-long-virtual-cluster-name", "ünïcødé", "x" * 200]
TAP_RE = re.compile(r"^vt[a-z2-7]{8}[0-9]{1,5}$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


@pytest.mark.parametrize("vc", VC_NAMES)
@pytest.mark.parametrize("index", [0, 1, 9, 10, 255, 4096, 99_999])
def test_tap_name_shape(vc: str, index: int) -> None:
    name = tap_name(vc, index)
    assert len(name) <= 15  # IFNAMSIZ - 1
    assert TAP_RE.match(name)
    assert name == tap_name(vc, index)  # deterministic


def test_tap_names_unique() -> None:
    names = [
        tap_name(vc, i) for vc in {*VC_NAMES, *(f"vc{n}" for n in range(1000))} for i in range(40)
    ]
    assert len(names) == len(set(names))
    # the index never runs into the hash part: same VC, indices 1 and 11 differ
    assert tap_name("vc1", 1) != tap_name("vc1", 11)
    assert tap_name("vc1", 1)[:10] == tap_name("vc1", 11)[:10]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: tap_name("vc", 100_000), "out of range for a tap name"),
        (lambda: tap_name("vc", -1), "out of range for a tap name"),
        (lambda: tap_name("", 0), "must not be empty"),
        (lambda: mac_for("vc", 65536), "out of range for a MAC"),
        (lambda: mac_for("", 0), "must not be empty"),
    ],
)
def test_name_errors(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match=message):
        call()


@pytest.mark.parametrize("vc", VC_NAMES)
@pytest.mark.parametrize("index", [0, 1, 255, 256, 65535])
def test_mac_format(vc: str, index: int) -> None:
    mac = mac_for(vc, index)
    assert MAC_RE.match(mac)
    first = int(mac[:2], 16)
    assert first & 0x02  # locally administered
    assert not first & 0x01  # unicast
    assert mac == mac_for(vc, index)
    assert int(mac[-5:].replace(":", ""), 16) == index


def test_macs_unique_within_and_across_vcs() -> None:
    macs = [mac_for(vc, i) for vc in VC_NAMES for i in range(300)]
    assert len(macs) == len(set(macs))
    assert mac_for("vc1", 0) != mac_for("vc2", 0)
    assert not mac_for("vc1", 0).startswith("52:54:00")  # not QEMU's default range


# --- egress and what the hosts' filters close to guests ------------------------------


@pytest.mark.parametrize("mode", ["none", "nat", "routed"])
def test_egress_modes_accepted(mode: str) -> None:
    assert validate_egress(mode) == mode


@pytest.mark.parametrize("mode", ["", "NAT", "open", "bridged"])
def test_bad_egress_refused(mode: str) -> None:
    with pytest.raises(InvalidArgument, match=r"bad egress .*: use none, nat, routed"):
        validate_egress(mode)


def test_the_record_knows_every_egress_mode() -> None:
    assert get_args(Egress) == EGRESS_MODES


@pytest.mark.parametrize(
    "networks, addresses, closed",
    [
        # a host inside the hosts' network adds nothing; one outside it adds its /32
        (["10.213.0.0/24"], ["10.213.0.11", "192.168.5.7"], ["10.213.0.0/24", "192.168.5.7/32"]),
        # the manager on loopback (one box) and names that are not addresses: left out
        ([], ["127.0.0.1", "0.0.0.0", "manager.example", "10.1.2.3"], ["10.1.2.3/32"]),
        # an interface address names its network; neighbours collapse
        ([IPv4Interface("10.9.0.5/25"), "10.9.0.128/25"], [], ["10.9.0.0/24"]),
        ([], [], []),
    ],
)  # fmt: skip
def test_host_filter_networks(networks: list, addresses: list[str], closed: list[str]) -> None:  # type: ignore[type-arg]
    assert host_filter_networks(networks, addresses) == closed
