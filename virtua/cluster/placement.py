"""Placement of the VMs of a virtual cluster onto physical hosts.

A pure, deterministic function in the manner of VirtuaLinux's Virtual Cluster Manager
(paper, section 4.3): it takes the hosts, what already runs on them and the VMs of one
virtual cluster (VC), and returns a plan -- a mapping VM -> host plus the list of VMs that
change host. It does no I/O and never looks at the clock, so the same input always gives
the same plan.

Strategies
----------
``block``
    Fill a host up to its *allowed number of VMs* before using the next one (minimise
    the number of hosts a VC spreads over). Implemented as first fit: each VM, in the
    given order, goes to the first host (in host order) that can take it.
``cyclic``
    Spread the VMs round-robin over all usable hosts. Implemented as "fewest VMs of this
    VC first, ties broken by host order"; from an empty start this is exactly
    round-robin (1, 2, 3, 4, 1, 2, ...), a host that is full is skipped, and VMs kept in
    place by a remap are counted, so re-placed VMs go where the VC is thinnest.

Modes
-----
``strict``
    One VM vCPU per physical core: a VM with C vCPUs needs C free cores on its host
    (free cores = ``cores - load.cores_used - cores of this VC's VMs already there``).
``lazy``
    vCPUs are not checked against cores (overcommit of CPU is allowed).

Memory is never overcommitted, in either mode: on every host
``load.memory_used_mb + memory of this VC's VMs there + reserved_memory_mb <= memory_mb``.

Allowed number of VMs per host
------------------------------
A host's allowed number of VMs is the largest number that keeps every constraint of the
mode true: in strict mode it is bounded by the free cores *and* the free memory; in lazy
mode by the free memory only. ``max_vms_per_host``, if given, is an extra cap on the
*total* number of VMs on a host -- the VMs of other VCs (``HostLoad.vms``) plus this
VC's. Block fills a host to that number; cyclic never exceeds it.

Hosts
-----
Hosts that are offline, draining, or whose ``templates`` set does not contain the VC's
template are never chosen (``templates=None`` means the host can run any template).
Host order is by name in natural order (``blade2`` before ``blade10``) by default, or
the order given (``order="given"``). VMs are placed in the order given (node index order).

Existing load
-------------
``load`` maps host name -> :class:`HostLoad`, what runs there *for other VCs*. It must
not include the VMs of the VC being placed: those are described by ``current`` (their
present host). Loads of hosts not in ``hosts`` are ignored. :func:`tally_load` builds a
load table from placed VMs.

Remap
-----
With ``current`` (VM -> host now), each VM whose host is still usable and still has room
(checked in VM order) stays there; only the others are placed by the strategy, and
``moves`` lists the VMs that change host. If keeping VMs in place leaves no room for the
rest (fragmentation with VMs of different sizes) and ``reshuffle`` is true, a fresh
placement is tried and, if it fits, returned with its moves. :func:`drain_plan` and
:func:`restart_plan` never reshuffle: only the VMs of the affected host move (plus any
VM whose own host no longer has room for it, e.g. because ``load`` grew).

Refusal
-------
:class:`~virtua.errors.PlacementError` names every host and the constraint that stopped
the first VM that could not be placed, e.g.::

    cannot place 20 VMs of 1 vCPU / 512 MiB in strict mode: host b1 has 0 free cores
    of 4 (needs 1), host b2 ..., host b3 is offline; 16 of 20 placed
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from virtua.errors import InvalidArgument, PlacementError

__all__ = [
    "HostCapacity",
    "HostLoad",
    "Mode",
    "Move",
    "Placement",
    "Strategy",
    "VMRequest",
    "drain_plan",
    "place",
    "restart_plan",
    "tally_load",
]


class Strategy(StrEnum):
    BLOCK = "block"
    CYCLIC = "cyclic"


class Mode(StrEnum):
    STRICT = "strict"
    LAZY = "lazy"


class HostCapacity(BaseModel):
    """A physical host as the placer sees it."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    cores: int = Field(ge=1)
    memory_mb: int = Field(ge=0)
    reserved_memory_mb: int = Field(default=0, ge=0)
    online: bool = True
    draining: bool = False
    templates: AbstractSet[str] | None = None  # None: can run any; stored as a frozenset


class VMRequest(BaseModel):
    """One VM of the virtual cluster: its name, vCPUs and memory."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    cpus: int = Field(ge=1)
    memory_mb: int = Field(ge=1)


class HostLoad(BaseModel):
    """What already runs on a host for other virtual clusters."""

    model_config = ConfigDict(frozen=True)

    cores_used: int = Field(default=0, ge=0)
    memory_used_mb: int = Field(default=0, ge=0)
    vms: int = Field(default=0, ge=0)


class Move(NamedTuple):
    vm: str
    source: str
    target: str


class Placement(BaseModel):
    """The plan: where each VM goes, and which VMs change host."""

    model_config = ConfigDict(frozen=True)

    mapping: dict[str, str]  # VM name -> host name, in VM order
    moves: list[Move] = Field(default_factory=list)  # VMs whose host changes
    new: list[str] = Field(default_factory=list)  # VMs that had no host before

    def vms_on(self, host: str) -> list[str]:
        return [vm for vm, h in self.mapping.items() if h == host]

    def counts(self, hosts: Iterable[str] | None = None) -> dict[str, int]:
        """Number of this VC's VMs per host (hosts with none included if listed)."""
        out: dict[str, int] = dict.fromkeys(hosts, 0) if hosts is not None else {}
        for h in self.mapping.values():
            out[h] = out.get(h, 0) + 1
        return out


# --- internals ----------------------------------------------------------------------


@dataclass
class _HostState:
    host: HostCapacity
    cores_used: int
    memory_used_mb: int
    vms: int  # all VMs on the host, other VCs included
    vc_vms: int = 0  # VMs of this VC
    unusable: str | None = None  # why the host is never chosen

    @property
    def free_cores(self) -> int:
        return max(0, self.host.cores - self.cores_used)

    @property
    def free_memory_mb(self) -> int:
        return max(0, self.host.memory_mb - self.host.reserved_memory_mb - self.memory_used_mb)

    def problems(self, vm: VMRequest, mode: Mode, cap: int | None) -> list[str]:
        """The constraints that stop ``vm`` from going here (empty: it fits)."""
        if self.unusable is not None:
            return [self.unusable]
        has: list[str] = []
        if mode is Mode.STRICT and vm.cpus > self.free_cores:
            free = self.free_cores
            has.append(
                f"{free} free core{'' if free == 1 else 's'} of {self.host.cores} (needs {vm.cpus})"
            )
        if vm.memory_mb > self.free_memory_mb:
            has.append(f"{self.free_memory_mb} MiB free memory (needs {vm.memory_mb})")
        out = ["has " + " and ".join(has)] if has else []
        if cap is not None and self.vms >= cap:
            out.append(f"already runs {self.vms} VM{'' if self.vms == 1 else 's'} (max {cap})")
        return out

    def add(self, vm: VMRequest) -> None:
        self.cores_used += vm.cpus
        self.memory_used_mb += vm.memory_mb
        self.vms += 1
        self.vc_vms += 1


_DIGITS = re.compile(r"(\d+)")


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(name) if part
    )


def _vm_desc(vm: VMRequest) -> str:
    return f"{vm.cpus} vCPU / {vm.memory_mb} MiB"


def _plural_vms(n: int) -> str:
    return f"{n} VM" if n == 1 else f"{n} VMs"


def _check_unique(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise InvalidArgument(f"duplicate {what} name {n!r}")
        seen.add(n)


class _Attempt(NamedTuple):
    mapping: dict[str, str] | None
    error: str | None


def _attempt(
    vms: Sequence[VMRequest],
    hosts: Sequence[HostCapacity],
    load: Mapping[str, HostLoad],
    strategy: Strategy,
    mode: Mode,
    template: str | None,
    keep: Mapping[str, str],
    cap: int | None,
) -> _Attempt:
    states: list[_HostState] = []
    for h in hosts:
        hl = load.get(h.name) or HostLoad()
        st = _HostState(h, hl.cores_used, hl.memory_used_mb, hl.vms)
        if not h.online:
            st.unusable = "is offline"
        elif h.draining:
            st.unusable = "is draining"
        elif template is not None and h.templates is not None and template not in h.templates:
            st.unusable = f"cannot run template {template!r}"
        states.append(st)
    by_name = {st.host.name: st for st in states}

    mapping: dict[str, str] = {}
    pending: list[VMRequest] = []
    for vm in vms:
        where = keep.get(vm.name)
        home = by_name.get(where) if where is not None else None
        if home is not None and not home.problems(vm, mode, cap):
            home.add(vm)
            mapping[vm.name] = home.host.name
        else:
            pending.append(vm)
    kept = len(mapping)

    unplaced: list[VMRequest] = []
    for vm in pending:
        fits = [st for st in states if not st.problems(vm, mode, cap)]
        if not fits:
            unplaced.append(vm)
            continue
        if strategy is Strategy.BLOCK:
            chosen = fits[0]
        else:  # min() keeps the first of equals, so ties go by host order
            chosen = min(fits, key=lambda s: s.vc_vms)
        chosen.add(vm)
        mapping[vm.name] = chosen.host.name

    if not unplaced:
        # Return in VM order whatever the order of assignment.
        return _Attempt({vm.name: mapping[vm.name] for vm in vms}, None)

    first = unplaced[0]
    uniform = all(_vm_desc(v) == _vm_desc(first) for v in pending)
    what = (
        f"{_plural_vms(len(pending))} of {_vm_desc(first)}"
        if uniform
        else f"{_plural_vms(len(pending))} ({first.name} needs {_vm_desc(first)})"
    )
    if states:
        reasons = ", ".join(
            f"host {st.host.name} " + " and ".join(st.problems(first, mode, cap)) for st in states
        )
    else:
        reasons = "no hosts"
    placed = len(pending) - len(unplaced)
    tail = f"; {placed} of {len(pending)} placed"
    if kept:
        tail += f" ({kept} kept on their hosts)"
    return _Attempt(None, f"cannot place {what} in {mode.value} mode: {reasons}{tail}")


def _ordered_hosts(
    hosts: Sequence[HostCapacity], order: Literal["name", "given"]
) -> list[HostCapacity]:
    if order == "name":
        return sorted(hosts, key=lambda h: (_natural_key(h.name), h.name))
    if order == "given":
        return list(hosts)
    raise InvalidArgument(f"bad host order {order!r}: expected 'name' or 'given'")


def _parse_enum(cls: type[Strategy] | type[Mode], value: str, what: str) -> Strategy | Mode:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise InvalidArgument(f"bad placement {what} {value!r}: expected {choices}") from None


# --- public API ---------------------------------------------------------------------


def place(
    vms: Sequence[VMRequest],
    hosts: Sequence[HostCapacity],
    *,
    load: Mapping[str, HostLoad] | None = None,
    strategy: Strategy | str = Strategy.BLOCK,
    mode: Mode | str = Mode.STRICT,
    template: str | None = None,
    current: Mapping[str, str] | None = None,
    max_vms_per_host: int | None = None,
    order: Literal["name", "given"] = "name",
    reshuffle: bool = True,
) -> Placement:
    """Place ``vms`` on ``hosts``; see the module docstring for the rules.

    ``current`` (VM -> host) turns this into a remap that keeps VMs where they are when
    still valid; entries for VMs not in ``vms`` are ignored. Raises
    :class:`PlacementError` if some VM fits nowhere, :class:`InvalidArgument` for
    duplicate names or a bad strategy/mode/order.
    """
    strat = _parse_enum(Strategy, strategy, "strategy")
    md = _parse_enum(Mode, mode, "mode")
    assert isinstance(strat, Strategy) and isinstance(md, Mode)
    if max_vms_per_host is not None and max_vms_per_host < 1:
        raise InvalidArgument(f"max_vms_per_host must be at least 1, not {max_vms_per_host}")
    _check_unique((v.name for v in vms), "VM")
    _check_unique((h.name for h in hosts), "host")
    ordered = _ordered_hosts(hosts, order)
    loads = dict(load or {})
    cur = {vm.name: current[vm.name] for vm in vms if current and vm.name in current}

    result = _attempt(vms, ordered, loads, strat, md, template, cur, max_vms_per_host)
    if result.mapping is None and cur and reshuffle:
        fresh = _attempt(vms, ordered, loads, strat, md, template, {}, max_vms_per_host)
        result = fresh
    if result.mapping is None:
        raise PlacementError(result.error or "cannot place VMs")

    mapping = result.mapping
    moves = [
        Move(vm, cur[vm], mapping[vm]) for vm in mapping if vm in cur and cur[vm] != mapping[vm]
    ]
    new = [vm for vm in mapping if vm not in cur]
    return Placement(mapping=mapping, moves=moves, new=new)


def _mark(hosts: Sequence[HostCapacity], host: str, update: dict[str, bool]) -> list[HostCapacity]:
    if host not in {h.name for h in hosts}:
        raise InvalidArgument(f"unknown host {host!r}")
    return [h.model_copy(update=update) if h.name == host else h for h in hosts]


def drain_plan(
    host: str,
    vms: Sequence[VMRequest],
    hosts: Sequence[HostCapacity],
    current: Mapping[str, str],
    *,
    load: Mapping[str, HostLoad] | None = None,
    strategy: Strategy | str = Strategy.BLOCK,
    mode: Mode | str = Mode.STRICT,
    template: str | None = None,
    max_vms_per_host: int | None = None,
    order: Literal["name", "given"] = "name",
) -> Placement:
    """Where the VMs of one VC that run on ``host`` go while ``host`` is drained.

    ``host`` is treated as draining whatever its flag says; every other VM of the VC
    stays where it is while it still fits there (no reshuffle), and ``moves`` lists the
    VMs leaving ``host``. ``current`` is the VC's mapping (VM -> host) now. To
    drain a host used by several VCs, plan them one after another, adding each plan to
    the load of the next (:func:`tally_load`).
    """
    return _replan(
        f"cannot drain host {host}", vms, _mark(hosts, host, {"draining": True}), current,
        load, strategy, mode, template, max_vms_per_host, order,
    )  # fmt: skip


def restart_plan(
    dead_host: str,
    vms: Sequence[VMRequest],
    hosts: Sequence[HostCapacity],
    current: Mapping[str, str],
    *,
    load: Mapping[str, HostLoad] | None = None,
    strategy: Strategy | str = Strategy.BLOCK,
    mode: Mode | str = Mode.STRICT,
    template: str | None = None,
    max_vms_per_host: int | None = None,
    order: Literal["name", "given"] = "name",
) -> Placement:
    """New hosts for the VMs of one VC that ran on ``dead_host`` (to restart them there).

    Like :func:`drain_plan`, with ``dead_host`` treated as offline. ``load`` must not
    count what ran on the dead host as still running elsewhere.
    """
    return _replan(
        f"cannot restart the VMs of host {dead_host}", vms, _mark(hosts, dead_host, {"online": False}),
        current, load, strategy, mode, template, max_vms_per_host, order,
    )  # fmt: skip


def _replan(
    what: str,
    vms: Sequence[VMRequest],
    hosts: Sequence[HostCapacity],
    current: Mapping[str, str],
    load: Mapping[str, HostLoad] | None,
    strategy: Strategy | str,
    mode: Mode | str,
    template: str | None,
    max_vms_per_host: int | None,
    order: Literal["name", "given"],
) -> Placement:
    """A remap that never reshuffles, its refusal prefixed with what was being done."""
    try:
        return place(
            vms, hosts, load=load, strategy=strategy, mode=mode, template=template, current=current,
            max_vms_per_host=max_vms_per_host, order=order, reshuffle=False,
        )  # fmt: skip
    except PlacementError as e:
        raise PlacementError(f"{what}: {e.message}") from None


def tally_load(
    vms: Iterable[VMRequest],
    mapping: Mapping[str, str],
    base: Mapping[str, HostLoad] | None = None,
) -> dict[str, HostLoad]:
    """``base`` plus the VMs of ``vms`` that ``mapping`` places (unmapped VMs are skipped).

    Use it to build the ``load`` for one VC from the placements of the others.
    """
    out = dict(base or {})
    for vm in vms:
        host = mapping.get(vm.name)
        if host is None:
            continue
        cur = out.get(host) or HostLoad()
        out[host] = HostLoad(
            cores_used=cur.cores_used + vm.cpus,
            memory_used_mb=cur.memory_used_mb + vm.memory_mb,
            vms=cur.vms + 1,
        )
    return out
