"""The cluster store on a real etcd cluster (virtua.cluster.kv's contract), through aetcd.

etcd gives what the manager cannot build itself: linearizable reads and writes agreed by a
quorum, compare-and-swap transactions on mod revisions, leases that expire on the leader's
clock, and ordered prefix watches. This module only translates.

One gRPC channel spans every endpoint (gRPC's pick_first over the list), so losing one
member moves the client to the next. Every call has a deadline: an etcd that has lost its
quorum does not answer, and that becomes `NoQuorum` instead of a hang.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc, watcher

from virtua.cluster.kv import (
    Compare,
    Entry,
    Event,
    LeaseExpired,
    NoQuorum,
    Op,
    Put,
    TxnResult,
    TxnWrites,
    decode,
    encode,
)
from virtua.errors import InvalidArgument, Unavailable

CALL_TIMEOUT = 5.0


@dataclass(frozen=True)
class EtcdTLS:
    ca: str
    cert: str
    key: str


def parse_endpoints(urls: str) -> list[tuple[str, int]]:
    """`http://10.0.0.1:2379,https://h2:2379` -> [(host, port), ...]; bad URLs are refused."""
    out = []
    for url in (u.strip() for u in urls.split(",")):
        if not url:
            continue
        rest = url.split("://", 1)[1] if "://" in url else url
        host, sep, port = rest.rstrip("/").rpartition(":")
        if not sep or not port.isdigit() or not host or "/" in host:
            raise InvalidArgument(f"bad etcd endpoint {url!r}: expected http(s)://HOST:PORT")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise InvalidArgument("no etcd endpoint given: --etcd URL[,URL...]")
    return out


class _Client(aetcd.Client):
    """aetcd's client with a channel over several endpoints, optionally over mutual TLS."""

    def __init__(self, endpoints: list[tuple[str, int]], tls: EtcdTLS | None, timeout: float) -> None:
        super().__init__(timeout=timeout)  # type: ignore[arg-type]
        self._target = "ipv4:" + ",".join(f"{h}:{p}" for h, p in endpoints)
        self._tls = tls
        self._is_connecting: bool = False

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            opts = [("grpc.lb_policy_name", "pick_first"), ("grpc.enable_retries", 1)]
            if self._tls is None:
                self.channel = rpc.insecure_channel(self._target, options=opts)
            else:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=_read(self._tls.ca),
                    private_key=_read(self._tls.key),
                    certificate_chain=_read(self._tls.cert),
                )
                self.channel = rpc.secure_channel(self._target, creds, options=opts)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=None)
            self._connected.set()
        finally:
            self._is_connecting = False


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class EtcdKV(TxnWrites):
    def __init__(self, urls: str, tls: EtcdTLS | None = None, timeout: float = CALL_TIMEOUT) -> None:
        self.urls = urls
        self.endpoints = parse_endpoints(urls)
        self.timeout = timeout
        self.client = _Client(self.endpoints, tls, timeout)
        self._background: set[asyncio.Task[Any]] = set()

    async def _call(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run one RPC with a deadline. A member that drops the connection makes gRPC move
        to the next endpoint, so UNAVAILABLE is retried until the deadline. A retried write
        may have been applied once already: writes that matter are CAS transactions, whose
        retry then fails its compare and the caller re-reads, as with etcd's own clients."""
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            try:
                return await asyncio.wait_for(call(), max(0.1, deadline - time.monotonic()) + 0.5)
            except (TimeoutError, aetcd.exceptions.ConnectionTimeoutError) as e:
                raise NoQuorum(
                    f"etcd at {self.urls} did not answer {what} within {self.timeout:g} s "
                    "(no quorum, or every member is down)"
                ) from e
            except (aetcd.exceptions.ConnectionFailedError, grpc.aio.AioRpcError) as e:
                retryable = not isinstance(e, grpc.aio.AioRpcError) or e.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                )
                if not retryable:
                    raise self._translate(what, e) from e
                if time.monotonic() + delay >= deadline:
                    raise NoQuorum(
                        f"etcd at {self.urls} is unreachable or has no quorum ({what}): {e}"
                    ) from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            except aetcd.exceptions.ClientError as e:
                raise self._translate(what, e) from e

    def _translate(self, what: str, e: Exception) -> Exception:
        msg = str(e.details() if isinstance(e, grpc.aio.AioRpcError) else e)
        if isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return NoQuorum(f"etcd at {self.urls}: {what}: {msg} (no quorum, or unreachable)")
        if "lease not found" in msg:
            return LeaseExpired(f"{what}: the lease has expired or was revoked")
        if "no leader" in msg or "timed out" in msg or "deadline" in msg.lower():
            return NoQuorum(f"etcd at {self.urls}: {what}: {msg} (no quorum)")
        return Unavailable(f"etcd at {self.urls}: {what}: {msg}")

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> Entry | None:
        r = await self._call(f"get {key}", lambda: self.client.get(key.encode()))
        return None if r is None else _entry(r)

    async def range(self, prefix: str) -> list[Entry]:
        r = await self._call(
            f"range {prefix}", lambda: self.client.get_prefix(prefix.encode(), sort_order="ascend")
        )
        return [_entry(kv) for kv in r]

    async def revision(self) -> int:
        async def count() -> Any:
            await self.client.connect()
            req = rpc.RangeRequest(key=b"\0", count_only=True)
            return await self.client.kvstub.Range(req, timeout=self.timeout)

        r = await self._call("a revision read", count)
        return int(r.header.revision)

    # ------------------------------------------------------------------ writes

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        t = self.client.transactions
        cmp = [t.mod(c.key.encode()) == c.mod_revision for c in compares]
        ok, responses = await self._call(
            "a transaction",
            lambda: self.client.transaction(
                compare=cmp, success=[self._op(o) for o in success], failure=[self._op(o) for o in failure]
            ),
        )
        rev = max((int(_header_rev(r)) for r in responses), default=0)
        if not rev:
            rev = await self.revision()
        return TxnResult(bool(ok), rev)

    def _op(self, op: Op) -> Any:
        t = self.client.transactions
        if isinstance(op, Put):
            return t.put(op.key.encode(), encode(op.value), lease=op.lease or None)
        return t.delete(op.key.encode())

    # ------------------------------------------------------------------ leases

    async def grant(self, ttl: int) -> int:
        if ttl < 1:
            raise InvalidArgument(f"bad lease TTL {ttl}: at least 1 second")
        lease = await self._call("lease grant", lambda: self.client.lease(ttl))
        return int(lease.id)

    async def keepalive(self, lease: int) -> int:
        r = await self._call("lease keepalive", lambda: self.client.refresh_lease(lease))
        ttl = int(r.TTL)
        if ttl <= 0:
            raise LeaseExpired(f"lease {lease:x} has expired or was revoked")
        return ttl

    async def lease_ttl(self, lease: int) -> int:
        r = await self._call("lease info", lambda: self.client.get_lease_info(lease))
        return int(r.TTL)

    async def revoke(self, lease: int) -> None:
        try:
            await self._call("lease revoke", lambda: self.client.revoke_lease(lease))
        except LeaseExpired:
            pass

    # ------------------------------------------------------------------ watch

    async def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[Event]:
        it = await self._call(
            f"watch {prefix}",
            lambda: self.client.watch_prefix(prefix.encode(), start_revision=start_revision or None),
        )
        try:
            async for ev in it:
                kind = "put" if ev.kind == "PUT" else "delete"
                value = decode(ev.kv.value) if kind == "put" else None
                yield Event(kind, ev.kv.key.decode(), value, int(ev.kv.mod_revision))
        except aetcd.exceptions.ClientError as e:
            raise Unavailable(f"etcd at {self.urls}: watch {prefix} ended: {e}") from e
        finally:
            # Closing must never hang the closer (aetcd's cancel can wait on its stream):
            # the cancellation runs on its own, bounded.
            cancel = getattr(it, "cancel", None)
            if cancel is not None:
                task = asyncio.get_running_loop().create_task(asyncio.wait_for(cancel(), 2))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.close(), 3)
        except Exception:
            pass


def _header_rev(resp: Any) -> int:
    for field in ("response_put", "response_delete_range", "response_range"):
        if resp.HasField(field):
            return int(getattr(resp, field).header.revision)
    return 0


def _entry(kv: Any) -> Entry:
    return Entry(kv.key.decode(), decode(kv.value), int(kv.create_revision), int(kv.mod_revision), int(kv.lease))

