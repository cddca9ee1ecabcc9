"""Placement of virtual-cluster VMs on hosts (VirtuaLinux paper, section 4.3)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtua.cluster.placement import (
    HostCapacity,
    HostLoad,
    Move,
    Placement,
    VMRequest,
    drain_plan,
    place,
    restart_plan,
    tally_load,
)
from virtua.errors import InvalidArgument, PlacementError

BLADES = ["b1", "b2", "b3", "b4"]


def blades(memory_mb: int = 8192, reserved: int = 1024, **overrides: dict) -> list[HostCapacity]:
    """The paper's example: 4 blades, each 2 x dual-core (4 cores)."""
    return [
        HostCapacity(
            name=n,
            cores=4,
            memory_mb=memory_mb,
            reserved_memory_mb=reserved,
            **overrides.get(n, {}),
        )
        for n in BLADES
    ]


def vc(n: int, cpus: int = 1, memory_mb: int = 512, prefix: str = "n") -> list[VMRequest]:
    return [VMRequest(name=f"{prefix}{i}", cpus=cpus, memory_mb=memory_mb) for i in range(n)]


def counts(p: Placement, hosts: list[str] = BLADES) -> list[int]:
    c = p.counts(hosts)
    return [c[h] for h in hosts]


def check_invariants(
    p: Placement,
    vms: list[VMRequest],
    hosts: list[HostCapacity],
    load: dict[str, HostLoad],
    mode: str,
    template: str | None = None,
    cap: int | None = None,
) -> None:
    by_host = {h.name: h for h in hosts}
    assert list(p.mapping) == [v.name for v in vms]
    total = tally_load(vms, p.mapping, load)
    for name in set(p.mapping.values()):
        h = by_host[name]
        assert h.online and not h.draining
        assert template is None or h.templates is None or template in h.templates
        own = tally_load(vms, p.mapping)[name]
        # memory is never overcommitted, in either mode
        assert total[name].memory_used_mb + h.reserved_memory_mb <= h.memory_mb
        if mode == "strict":
            base = load.get(name, HostLoad()).cores_used
            assert base + own.cores_used <= h.cores
        if cap is not None:
            assert total[name].vms <= cap


# --- the paper's example, table-driven ---------------------------------------------


@pytest.mark.parametrize(
    "n, cpus, memory_mb, strategy, mode, expected",
    [
        # 8 single-vCPU VMs
        (8, 1, 512, "block", "strict", [4, 4, 0, 0]),
        (8, 1, 512, "cyclic", "strict", [2, 2, 2, 2]),
        (8, 1, 512, "block", "lazy", [8, 0, 0, 0]),  # lazy block fills by memory
        (8, 1, 512, "cyclic", "lazy", [2, 2, 2, 2]),
        # exactly the cores of the cluster
        (16, 1, 512, "block", "strict", [4, 4, 4, 4]),
        (16, 1, 512, "cyclic", "strict", [4, 4, 4, 4]),
        # 20 VMs: more vCPUs than cores, fine in lazy mode
        (20, 1, 512, "cyclic", "lazy", [5, 5, 5, 5]),
        (20, 1, 512, "block", "lazy", [14, 6, 0, 0]),  # 7168 MiB usable / 512
        (20, 1, 1024, "block", "lazy", [7, 7, 6, 0]),  # 7168 MiB usable / 1024
        (20, 1, 1024, "cyclic", "lazy", [5, 5, 5, 5]),
        # odd count: round-robin starts again from the first host
        (7, 1, 512, "cyclic", "strict", [2, 2, 2, 1]),
        (1, 1, 512, "cyclic", "strict", [1, 0, 0, 0]),
        # 2-vCPU VMs: two per blade in strict mode
        (4, 2, 512, "block", "strict", [2, 2, 0, 0]),
        (4, 2, 512, "cyclic", "strict", [1, 1, 1, 1]),
        (8, 2, 512, "block", "strict", [2, 2, 2, 2]),
        (12, 2, 512, "block", "lazy", [12, 0, 0, 0]),
        # 3-vCPU VMs waste a core per blade in strict mode
        (4, 3, 512, "block", "strict", [1, 1, 1, 1]),
        # one VM as big as a blade
        (4, 4, 1024, "block", "strict", [1, 1, 1, 1]),
        (2, 4, 7168, "block", "lazy", [1, 1, 0, 0]),  # memory alone decides
    ],
)
def test_paper_example(
    n: int, cpus: int, memory_mb: int, strategy: str, mode: str, expected: list[int]
) -> None:
    hosts = blades()
    vms = vc(n, cpus, memory_mb)
    p = place(vms, hosts, strategy=strategy, mode=mode)
    assert counts(p) == expected
    assert p.moves == [] and p.new == [v.name for v in vms]
    check_invariants(p, vms, hosts, {}, mode)


def test_block_is_first_fit_and_cyclic_is_round_robin() -> None:
    p = place(vc(6), blades(), strategy="block")
    assert p.mapping == {"n0": "b1", "n1": "b1", "n2": "b1", "n3": "b1", "n4": "b2", "n5": "b2"}
    p = place(vc(6), blades(), strategy="cyclic")
    assert p.mapping == {"n0": "b1", "n1": "b2", "n2": "b3", "n3": "b4", "n4": "b1", "n5": "b2"}


@pytest.mark.parametrize(
    "n, cpus, memory_mb, mode, kwargs, message",
    [
        (
            20, 1, 512, "strict", {},
            "cannot place 20 VMs of 1 vCPU / 512 MiB in strict mode: "
            "host b1 has 0 free cores of 4 (needs 1), host b2 has 0 free cores of 4 (needs 1), "
            "host b3 has 0 free cores of 4 (needs 1), host b4 has 0 free cores of 4 (needs 1); "
            "16 of 20 placed",
        ),
        (
            5, 3, 512, "strict", {},
            "cannot place 5 VMs of 3 vCPU / 512 MiB in strict mode: "
            "host b1 has 1 free core of 4 (needs 3), host b2 has 1 free core of 4 (needs 3), "
            "host b3 has 1 free core of 4 (needs 3), host b4 has 1 free core of 4 (needs 3); "
            "4 of 5 placed",
        ),
        (
            1, 8, 512, "strict", {},
            "cannot place 1 VM of 8 vCPU / 512 MiB in strict mode: "
            "host b1 has 4 free cores of 4 (needs 8), host b2 has 4 free cores of 4 (needs 8), "
            "host b3 has 4 free cores of 4 (needs 8), host b4 has 4 free cores of 4 (needs 8); "
            "0 of 1 placed",
        ),
        (
            # lazy mode: memory is the only limit, and it is never overcommitted
            30, 1, 1024, "lazy", {},
            "cannot place 30 VMs of 1 vCPU / 1024 MiB in lazy mode: "
            "host b1 has 0 MiB free memory (needs 1024), host b2 has 0 MiB free memory "
            "(needs 1024), host b3 has 0 MiB free memory (needs 1024), host b4 has 0 MiB "
            "free memory (needs 1024); 28 of 30 placed",
        ),
        (
            # both constraints bind
            5, 4, 7168, "strict", {},
            "cannot place 5 VMs of 4 vCPU / 7168 MiB in strict mode: "
            "host b1 has 0 free cores of 4 (needs 4) and 0 MiB free memory (needs 7168), "
            "host b2 has 0 free cores of 4 (needs 4) and 0 MiB free memory (needs 7168), "
            "host b3 has 0 free cores of 4 (needs 4) and 0 MiB free memory (needs 7168), "
            "host b4 has 0 free cores of 4 (needs 4) and 0 MiB free memory (needs 7168); "
            "4 of 5 placed",
        ),
        (
            9, 1, 512, "lazy", {"max_vms_per_host": 2},
            "cannot place 9 VMs of 1 vCPU / 512 MiB in lazy mode: "
            "host b1 already runs 2 VMs (max 2), host b2 already runs 2 VMs (max 2), "
            "host b3 already runs 2 VMs (max 2), host b4 already runs 2 VMs (max 2); "
            "8 of 9 placed",
        ),
    ],
)  # fmt: skip
def test_refusal_names_each_host_and_constraint(
    n: int, cpus: int, memory_mb: int, mode: str, kwargs: dict, message: str
) -> None:
    for strategy in ("block", "cyclic"):
        with pytest.raises(PlacementError) as exc:
            place(vc(n, cpus, memory_mb), blades(), strategy=strategy, mode=mode, **kwargs)
        assert exc.value.message == message


def test_refusal_with_unusable_hosts_and_mixed_sizes() -> None:
    hosts = blades(
        b2={"online": False}, b3={"draining": True}, b4={"templates": {"debian"}}
    )  # fmt: skip
    vms = [VMRequest(name="big", cpus=4, memory_mb=512), VMRequest(name="a", cpus=1, memory_mb=512)]
    with pytest.raises(PlacementError) as exc:
        place(vms + vc(1, 1, 512, "x"), hosts, template="centos")
    assert exc.value.message == (
        "cannot place 3 VMs (a needs 1 vCPU / 512 MiB) in strict mode: "
        "host b1 has 0 free cores of 4 (needs 1), host b2 is offline, host b3 is draining, "
        "host b4 cannot run template 'centos'; 1 of 3 placed"
    )


def test_no_hosts() -> None:
    with pytest.raises(PlacementError, match="in strict mode: no hosts; 0 of 2 placed"):
        place(vc(2), [])


# --- existing load, unusable hosts, templates --------------------------------------


@pytest.mark.parametrize(
    "load, strategy, mode, expected",
    [
        # b1 runs 3 cores of another VC, b2 has no memory left
        (
            {"b1": HostLoad(cores_used=3, memory_used_mb=1536, vms=3),
             "b2": HostLoad(cores_used=1, memory_used_mb=7168, vms=1)},
            "block", "strict", [1, 0, 4, 3],
        ),
        (
            {"b1": HostLoad(cores_used=3, memory_used_mb=1536, vms=3),
             "b2": HostLoad(cores_used=1, memory_used_mb=7168, vms=1)},
            "cyclic", "strict", [1, 0, 4, 3],
        ),
        # lazy mode ignores cores even if other VCs already overcommit them
        ({"b1": HostLoad(cores_used=12, memory_used_mb=1024, vms=12)}, "block", "lazy", [8, 0, 0, 0]),
        ({"b1": HostLoad(cores_used=12, memory_used_mb=1024, vms=12)}, "block", "strict", [0, 4, 4, 0]),
        # loads of unknown hosts are ignored
        ({"elsewhere": HostLoad(cores_used=99, memory_used_mb=99, vms=9)}, "block", "strict",
         [4, 4, 0, 0]),
    ],
)  # fmt: skip
def test_existing_load(
    load: dict[str, HostLoad], strategy: str, mode: str, expected: list[int]
) -> None:
    hosts = blades()
    vms = vc(8)
    p = place(vms, hosts, load=load, strategy=strategy, mode=mode)
    assert counts(p) == expected
    check_invariants(p, vms, hosts, load, mode)


@pytest.mark.parametrize(
    "overrides, template, strategy, expected",
    [
        ({"b1": {"online": False}}, None, "block", [0, 4, 4, 0]),
        ({"b1": {"draining": True}}, None, "cyclic", [0, 3, 3, 2]),
        ({"b1": {"online": False}, "b2": {"draining": True}}, None, "cyclic", [0, 0, 4, 4]),
        ({"b1": {"templates": {"debian"}}}, "centos", "block", [0, 4, 4, 0]),
        ({"b1": {"templates": {"debian", "centos"}}}, "centos", "block", [4, 4, 0, 0]),
        ({"b1": {"templates": set()}}, "centos", "cyclic", [0, 3, 3, 2]),
        # no template asked: any host
        ({"b1": {"templates": {"debian"}}}, None, "block", [4, 4, 0, 0]),
    ],
)
def test_unusable_hosts_are_skipped(
    overrides: dict, template: str | None, strategy: str, expected: list[int]
) -> None:
    hosts = blades(**overrides)
    vms = vc(8)
    p = place(vms, hosts, strategy=strategy, template=template)
    assert counts(p) == expected
    check_invariants(p, vms, hosts, {}, "strict", template)


def test_reserved_memory_is_respected() -> None:
    hosts = [HostCapacity(name="h", cores=64, memory_mb=4096, reserved_memory_mb=1024)]
    assert counts(place(vc(6), hosts, mode="lazy"), ["h"]) == [6]
    with pytest.raises(PlacementError, match="host h has 0 MiB free memory"):
        place(vc(7), hosts, mode="lazy")


@pytest.mark.parametrize(
    "cap, load, expected",
    [
        (3, {}, [3, 3, 2, 0]),
        (2, {}, [2, 2, 2, 2]),
        # the cap counts the VMs of other VCs too
        (3, {"b1": HostLoad(vms=2, memory_used_mb=1024, cores_used=2)}, [1, 3, 3, 1]),
    ],
)
def test_max_vms_per_host(cap: int, load: dict[str, HostLoad], expected: list[int]) -> None:
    hosts = blades()
    vms = vc(8)
    p = place(vms, hosts, load=load, max_vms_per_host=cap)
    assert counts(p) == expected
    check_invariants(p, vms, hosts, load, "strict", cap=cap)


# --- remap -------------------------------------------------------------------------


def test_remap_keeps_valid_mapping() -> None:
    hosts = blades()
    vms = vc(8)
    first = place(vms, hosts, strategy="cyclic")
    # a different strategy does not move what is already validly placed
    again = place(vms, hosts, strategy="block", current=first.mapping)
    assert again.mapping == first.mapping
    assert again.moves == [] and again.new == []


@pytest.mark.parametrize(
    "strategy, overrides, expected_counts, expected_moves",
    [
        ("block", {"b1": {"online": False}}, [0, 4, 4, 0],
         [Move("n0", "b1", "b3"), Move("n1", "b1", "b3"), Move("n2", "b1", "b3"),
          Move("n3", "b1", "b3")]),
        ("cyclic", {"b4": {"draining": True}}, [3, 3, 2, 0],
         [Move("n3", "b4", "b1"), Move("n7", "b4", "b2")]),
        ("cyclic", {"b2": {"templates": {"other"}}}, [3, 0, 3, 2],
         [Move("n1", "b2", "b1"), Move("n5", "b2", "b3")]),
    ],
)  # fmt: skip
def test_remap_moves_only_what_must_move(
    strategy: str, overrides: dict, expected_counts: list[int], expected_moves: list[Move]
) -> None:
    vms = vc(8)
    before = place(vms, blades(), strategy=strategy)
    hosts = blades(**overrides)
    after = place(vms, hosts, strategy=strategy, current=before.mapping, template="t")
    assert counts(after) == expected_counts
    assert after.moves == expected_moves
    for vm, host in before.mapping.items():
        if vm not in {m.vm for m in expected_moves}:
            assert after.mapping[vm] == host
    check_invariants(after, vms, hosts, {}, "strict", "t")


def test_remap_moves_vm_whose_host_got_too_full() -> None:
    vms = vc(8)
    before = place(vms, blades())  # 4, 4, 0, 0
    load = {"b2": HostLoad(cores_used=2, memory_used_mb=1024, vms=2)}  # another VC came
    after = place(vms, blades(), load=load, current=before.mapping)
    assert counts(after) == [4, 2, 2, 0]
    assert after.moves == [Move("n6", "b2", "b3"), Move("n7", "b2", "b3")]


def test_remap_grows_and_shrinks_the_vc() -> None:
    before = place(vc(6), blades(), strategy="cyclic")
    grown = place(vc(8), blades(), strategy="cyclic", current=before.mapping)
    assert grown.moves == [] and grown.new == ["n6", "n7"]
    assert counts(grown) == [2, 2, 2, 2]
    shrunk = place(vc(3), blades(), strategy="cyclic", current=grown.mapping)
    assert shrunk.mapping == {"n0": "b1", "n1": "b2", "n2": "b3"}
    assert shrunk.moves == [] and shrunk.new == []


def test_remap_reshuffles_only_when_keeping_cannot_fit() -> None:
    hosts = [HostCapacity(name=n, cores=4, memory_mb=8192) for n in ("h1", "h2")]
    vms = [
        VMRequest(name="a", cpus=2, memory_mb=512),
        VMRequest(name="b", cpus=2, memory_mb=512),
        VMRequest(name="c", cpus=4, memory_mb=512),
    ]
    current = {"a": "h1", "b": "h2"}
    p = place(vms, hosts, current=current)
    assert p.mapping == {"a": "h1", "b": "h1", "c": "h2"}
    assert p.moves == [Move("b", "h2", "h1")] and p.new == ["c"]
    with pytest.raises(PlacementError) as exc:
        place(vms, hosts, current=current, reshuffle=False)
    assert exc.value.message == (
        "cannot place 1 VM of 4 vCPU / 512 MiB in strict mode: host h1 has 2 free cores of 4 "
        "(needs 4), host h2 has 2 free cores of 4 (needs 4); 0 of 1 placed (2 kept on their hosts)"
    )


# --- drain and restart -------------------------------------------------------------


def test_drain_plan_moves_only_the_drained_host() -> None:
    vms = vc(8)
    hosts = blades()
    before = place(vms, hosts, strategy="cyclic")
    plan = drain_plan("b1", vms, hosts, before.mapping, strategy="cyclic")
    assert plan.moves == [Move("n0", "b1", "b2"), Move("n4", "b1", "b3")]
    assert "b1" not in plan.mapping.values()
    assert counts(plan) == [0, 3, 3, 2]


def test_drain_plan_refused() -> None:
    vms = vc(16)
    hosts = blades()
    before = place(vms, hosts)
    with pytest.raises(PlacementError) as exc:
        drain_plan("b3", vms, hosts, before.mapping)
    assert exc.value.message == (
        "cannot drain host b3: cannot place 4 VMs of 1 vCPU / 512 MiB in strict mode: "
        "host b1 has 0 free cores of 4 (needs 1), host b2 has 0 free cores of 4 (needs 1), "
        "host b3 is draining, host b4 has 0 free cores of 4 (needs 1); "
        "0 of 4 placed (12 kept on their hosts)"
    )
    # lazy mode takes them (memory permitting)
    plan = drain_plan("b3", vms, hosts, before.mapping, mode="lazy")
    assert counts(plan) == [8, 4, 0, 4]


def test_drain_across_vcs_with_tally_load() -> None:
    hosts = blades()
    vc_a, vc_b = vc(4, prefix="a"), vc(4, prefix="b")
    map_a = {v.name: h for v, h in zip(vc_a, ["b1", "b1", "b2", "b2"], strict=True)}
    map_b = {v.name: h for v, h in zip(vc_b, ["b1", "b1", "b3", "b3"], strict=True)}
    plan_a = drain_plan("b1", vc_a, hosts, map_a, load=tally_load(vc_b, map_b))
    assert plan_a.mapping == {"a0": "b2", "a1": "b2", "a2": "b2", "a3": "b2"}
    plan_b = drain_plan("b1", vc_b, hosts, map_b, load=tally_load(vc_a, plan_a.mapping))
    assert plan_b.mapping == {"b0": "b3", "b1": "b3", "b2": "b3", "b3": "b3"}


def test_restart_plan_for_dead_host() -> None:
    vms = vc(6, cpus=2)
    hosts = blades()
    before = place(vms, hosts)  # 2, 2, 2, 0
    plan = restart_plan("b2", vms, hosts, before.mapping)
    assert plan.moves == [Move("n2", "b2", "b4"), Move("n3", "b2", "b4")]
    with pytest.raises(
        PlacementError, match=r"^cannot restart the VMs of host b2: .*b2 is offline"
    ):
        restart_plan("b2", vc(8, cpus=2), hosts, place(vc(8, cpus=2), hosts).mapping)
    with pytest.raises(InvalidArgument, match="unknown host 'b9'"):
        restart_plan("b9", vms, hosts, before.mapping)


# --- determinism and input checks ---------------------------------------------------


def test_determinism_and_host_order() -> None:
    names = ["blade10", "blade2", "blade1", "blade3"]
    hosts = [HostCapacity(name=n, cores=2, memory_mb=4096) for n in names]
    vms = vc(5)
    p = place(vms, hosts)
    assert list(dict.fromkeys(p.mapping.values())) == ["blade1", "blade2", "blade3"]
    rng = random.Random(7)
    for _ in range(20):
        shuffled = hosts[:]
        rng.shuffle(shuffled)
        assert place(vms, shuffled) == p
        assert place(vms, shuffled, strategy="cyclic") == place(vms, hosts, strategy="cyclic")
    given_order = place(vms, hosts, order="given")
    assert list(dict.fromkeys(given_order.mapping.values())) == ["blade10", "blade2", "blade1"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: place(vc(1) + vc(1), blades()), "duplicate VM name 'n0'"),
        (lambda: place(vc(1), blades() + blades()[:1]), "duplicate host name 'b1'"),
        (lambda: place(vc(1), blades(), strategy="spread"), "bad placement strategy 'spread'"),
        (lambda: place(vc(1), blades(), mode="loose"), "bad placement mode 'loose'"),
        (lambda: place(vc(1), blades(), max_vms_per_host=0), "max_vms_per_host must be at least 1"),
        (lambda: place(vc(1), blades(), order="random"), "bad host order 'random'"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match=message):
        call()


def test_models_validate() -> None:
    with pytest.raises(ValueError):
        VMRequest(name="x", cpus=0, memory_mb=512)
    with pytest.raises(ValueError):
        HostCapacity(name="h", cores=0, memory_mb=1)
    h = HostCapacity(name="h", cores=1, memory_mb=1, templates={"a"})
    assert h.templates == frozenset({"a"})


def test_tally_load() -> None:
    vms = [VMRequest(name="a", cpus=2, memory_mb=100), VMRequest(name="b", cpus=1, memory_mb=50)]
    base = {"h1": HostLoad(cores_used=1, memory_used_mb=10, vms=1)}
    assert tally_load(vms, {"a": "h1", "b": "h2"}, base) == {
        "h1": HostLoad(cores_used=3, memory_used_mb=110, vms=2),
        "h2": HostLoad(cores_used=1, memory_used_mb=50, vms=1),
    }
    assert tally_load(vms, {}) == {}


# --- invariants on random inputs ----------------------------------------------------

_hosts = st.lists(
    st.builds(
        HostCapacity,
        name=st.sampled_from([f"h{i}" for i in range(8)]),
        cores=st.integers(1, 8),
        memory_mb=st.integers(0, 8192),
        reserved_memory_mb=st.integers(0, 1024),
        online=st.booleans(),
        draining=st.booleans(),
        templates=st.none() | st.sets(st.sampled_from(["t1", "t2"])),
    ),
    max_size=6,
    unique_by=lambda h: h.name,
)
_vms = st.lists(
    st.builds(VMRequest, name=st.just("v"), cpus=st.integers(1, 4), memory_mb=st.integers(1, 2048)),
    max_size=16,
).map(lambda vs: [v.model_copy(update={"name": f"v{i}"}) for i, v in enumerate(vs)])
_load = st.dictionaries(
    st.sampled_from([f"h{i}" for i in range(8)]),
    st.builds(
        HostLoad,
        cores_used=st.integers(0, 8),
        memory_used_mb=st.integers(0, 4096),
        vms=st.integers(0, 4),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    hosts=_hosts,
    vms=_vms,
    load=_load,
    strategy=st.sampled_from(["block", "cyclic"]),
    mode=st.sampled_from(["strict", "lazy"]),
    template=st.none() | st.sampled_from(["t1", "t2"]),
    cap=st.none() | st.integers(1, 6),
    data=st.data(),
)
def test_invariants_hold_on_random_inputs(
    hosts, vms, load, strategy, mode, template, cap, data
) -> None:  # type: ignore[no-untyped-def]
    kw = dict(load=load, strategy=strategy, mode=mode, template=template, max_vms_per_host=cap)
    try:
        p = place(vms, hosts, **kw)
    except PlacementError as e:
        assert e.message.startswith(f"cannot place {len(vms)} VM")
        for h in hosts:
            assert f"host {h.name} " in e.message
        return
    check_invariants(p, vms, hosts, load, mode, template, cap)
    assert place(vms, hosts, **kw) == p  # deterministic
    # a remap of a valid plan onto the same hosts moves nothing
    again = place(vms, hosts, current=p.mapping, **kw)
    assert again.mapping == p.mapping and again.moves == []
    # remap after a host goes away: only its VMs move, and the result is still valid
    if hosts:
        gone = data.draw(st.sampled_from(hosts)).name
        try:
            r = restart_plan(gone, vms, hosts, p.mapping, **kw)
        except PlacementError:
            return
        assert {m.vm for m in r.moves} == {vm for vm, h in p.mapping.items() if h == gone}
        dead = [h.model_copy(update={"online": False}) if h.name == gone else h for h in hosts]
        check_invariants(r, vms, dead, load, mode, template, cap)
