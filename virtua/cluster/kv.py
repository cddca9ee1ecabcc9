"""The cluster state store's contract: keys -> JSON documents, with etcd's guarantees.

Two implementations keep one contract (tests/unit/test_kv_contract.py runs against both):
- `SQLiteKV` (virtua.cluster.kv_sqlite): the embedded default inside one `virtua serve`.
- `EtcdKV` (virtua.cluster.kv_etcd): a real etcd cluster, for a master-less control plane.

What distribution needs and the contract therefore promises:
- **Revisions.** Every change bumps one store-wide revision; each key records the revision
  that created it and the one that last changed it (etcd's create/mod revisions).
- **Compare-and-swap transactions.** `txn(compares, success, failure)` applies one list of
  writes atomically depending on comparisons of keys' mod revisions (0 = key absent), so
  every read-modify-write is `get` then `put_if(key, value, expected_rev)`.
- **Leases.** A key written with a lease disappears when the lease expires or is revoked.
  Expiry is measured by the store's own clock (monotonic, or etcd's TTLs), never by a
  client's wall clock, so a clock jump on a host changes nothing.
- **Prefix watch.** `watch(prefix, start_revision)` yields every change under the prefix
  from that revision on, in revision order, including deletions by lease expiry.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from virtua.errors import Unavailable

Doc = dict[str, Any]


@dataclass(frozen=True)
class Entry:
    key: str
    value: Doc
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    kind: str  # "put" or "delete"
    key: str
    value: Doc | None  # None for a delete
    revision: int


@dataclass(frozen=True)
class Compare:
    """The key's mod revision equals `mod_revision` (0: the key does not exist)."""

    key: str
    mod_revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: Doc
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int


class LeaseExpired(Unavailable):
    """The lease is gone (expired or revoked): whatever it protected is no longer ours."""


class NoQuorum(Unavailable):
    """The store cannot commit or read linearizably (etcd lost its quorum, or is down)."""


class KV(Protocol):
    async def get(self, key: str) -> Entry | None: ...
    async def range(self, prefix: str) -> list[Entry]: ...
    async def put(self, key: str, value: Doc, lease: int = 0) -> int: ...
    async def delete(self, key: str) -> int: ...
    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult: ...
    async def revision(self) -> int: ...
    async def grant(self, ttl: int) -> int: ...
    async def keepalive(self, lease: int) -> int: ...
    async def revoke(self, lease: int) -> None: ...
    async def lease_ttl(self, lease: int) -> int: ...
    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[Event]: ...
    async def close(self) -> None: ...


class TxnWrites:
    """put and delete as one-operation transactions, for stores whose primitive is txn()."""

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        raise NotImplementedError

    async def put(self, key: str, value: Doc, lease: int = 0) -> int:
        return (await self.txn([], [Put(key, value, lease)])).revision

    async def delete(self, key: str) -> int:
        return (await self.txn([], [Delete(key)])).revision


async def put_if(kv: KV, key: str, value: Doc, expected_revision: int, lease: int = 0) -> bool:
    """Compare-and-swap one key: write only if its mod revision is still the one we read
    (0: only if it does not exist yet). False means someone else changed it first."""
    r = await kv.txn([Compare(key, expected_revision)], [Put(key, value, lease)])
    return r.succeeded


async def delete_if(kv: KV, key: str, expected_revision: int) -> bool:
    r = await kv.txn([Compare(key, expected_revision)], [Delete(key)])
    return r.succeeded


def encode(value: Doc) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes) -> Doc:
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("a stored value is not a JSON object")
    return doc
