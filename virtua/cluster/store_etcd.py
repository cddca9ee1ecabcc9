"""The manager's `StateStore` on a real etcd cluster, through etcd v3's JSON gateway.

The manager calls its store synchronously from its event loop, so every call here is one
short HTTP request (a sync `httpx.Client`, keep-alive, bounded timeouts): `POST
/v3/kv/range`, `/v3/kv/put`, `/v3/kv/deleterange`, `/v3/kv/txn`, keys and values base64.
Every key lives under one prefix (default `/virtua/`); values are the JSON documents the
SQLite store keeps.

`txn()` buffers its puts and deletes and commits them at the end as ONE etcd transaction.
Reads inside it see its own writes. The transaction is a compare-and-swap: every key read
inside it must still have the mod revision it was read at (0: still absent), and no key may
have appeared or changed under a prefix it ranged over; otherwise nothing is written and
`StoreConflict` is raised (retrying is the caller's choice).

Several endpoints: a request that cannot connect goes to the next one. A cluster that
cannot be reached, or that does not answer in time or says it has no leader, is
`Unavailable` with a message saying which. For a caller on an event loop
(`probe_in_background`: serve) a call costs at most CALL_BUDGET in all, and after one
failed, calls fail at once until a thread of the store sees etcd answer again.

Every write (a `put` or `delete` outside `txn()` too: each is a transaction of one) also
puts this serve's marker key (PREFIX/.txn while it holds the prefix's claim, else
PREFIX/.txn/<process id>) to a fresh nonce, on condition that the marker is still at the
mod revision this store last saw (never 0: the marker is created first, alone). A write
whose answer is lost (sent, then a read timeout, a cut connection, "leader changed" or
"request timed out") is never sent again, and no other write is sent until it is settled
by a fence: a compare-and-swap of the marker from that revision to a tombstone nonce. It
succeeds: the lost write was not applied and never can be, however late a member hands
it to the leader (its condition on the marker is false for good: a mod revision never
comes back). It fails and the marker holds the lost write's nonce: it was applied
(success). etcd unreachable for RESOLVE_WAIT: `OutcomeUnknown`; the next write (or
`settle`) settles it first. So a write acknowledged after a lost one is never overwritten
by it.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import os
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from virtua.cluster.store import StoreConflict
from virtua.errors import Busy, InvalidArgument, NoSpace, OutcomeUnknown, Unavailable, VirtuaError
from virtua.pki.credentials import Credentials

log = logging.getLogger("virtua.store")

CONNECT_TIMEOUT = 1.0  # loopback or a LAN: a member that does not accept in 1 s is down
READ_TIMEOUT = 2.0  # etcd answers in ms; a member without quorum never does
# after the cluster failed to answer, calls fail at once for this long (the manager's event
# loop must not wait a read timeout per call while etcd is away), then one probes again
HOLD_DOWN = 2.0
# one call's whole time, every member and every wait for an election included: what a sick
# cluster can cost the caller's event loop once (serve's guests' disks share that loop)
CALL_BUDGET = 3.0
PROBE_EVERY = 0.5  # seconds between the background probes of a cluster that failed a call
PAGE = 500  # keys per range request (a prefix range pages on)
DEFAULT_MAX_TXN_OPS = 128  # etcd's own default --max-txn-ops
CLAIM = "/.claim"  # the key of the serve that manages a prefix (no name starts with '.')
# etcd's answer when it cannot agree (no leader, lost quorum, a proposal that timed out)
_NO_QUORUM = ("no leader", "request timed out", "leader changed", "timed out", "not capable", "too many requests")


# answers that say an election is under way (the leader went): worth a short wait
_ELECTING = ("no leader", "leader changed")
# of those, the answers etcd gives before it proposes a write (so it was not applied)
_REFUSED = ("no leader", "not capable", "too many requests")
ELECTION_WAIT = 2.5  # seconds: etcd elects a new leader within its election timeout (1 s in a lab)
ELECTION_POLL = 0.1
MARKER = "/.txn"  # this serve's transaction marker (under the prefix; no name starts with '.')
RESOLVE_WAIT = 6.0  # seconds to settle a lost transaction's outcome before OutcomeUnknown
KEEP_OUTCOMES = 64  # settled outcomes remembered for `settle(txn)` (job recovery)
_txns_sent = 0  # this process's state transactions, for the failpoints (VIRTUA_ETCD_*)


class _AnswerLost(Unavailable):
    """A non-idempotent request was sent and its answer lost: applied or not, unknown."""


class _OutOfTime(Unavailable):
    """The call's budget ran out before any member was asked: nothing said about etcd."""


class _Electing(Unavailable):
    def __init__(self, message: str, not_applied: bool) -> None:
        super().__init__(message)
        self.not_applied = not_applied  # "no leader": etcd refused it before proposing it


def _no_quorum(failures: list[str], reachable: int, n: int, electing: bool, not_applied: bool) -> Unavailable:
    message = (f"etcd has no quorum: {reachable} of {n} member(s) reachable, {n // 2 + 1} needed "
               f"({'; '.join(failures)})")
    return _Electing(message, not_applied) if electing else Unavailable(message)


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def prefix_end(key: bytes) -> bytes:
    """The first key after every key that starts with `key` (etcd's range_end of a prefix)."""
    b = bytearray(key)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"  # every key


def parse_urls(urls: str) -> list[str]:
    out = []
    for url in (u.strip().rstrip("/") for u in urls.split(",")):
        if not url:
            continue
        if "://" not in url:
            url = "http://" + url
        scheme, _, rest = url.partition("://")
        host, sep, port = rest.rpartition(":")
        if scheme not in ("http", "https") or not sep or not port.isdigit() or not host or "/" in rest:
            raise InvalidArgument(f"bad etcd endpoint {url!r}: expected http(s)://HOST:PORT")
        out.append(url)
    if not out:
        raise InvalidArgument("no etcd endpoint given: expected http(s)://HOST:PORT[,...]")
    return out


@dataclass
class _Txn:
    writes: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # key -> value, None: delete
    read_revs: dict[str, int] = field(default_factory=dict)  # full key -> mod revision seen (0: absent)
    ranges: dict[str, int] = field(default_factory=dict)  # full prefix -> header revision of the read


class EtcdStateStore:
    txn_overhead = 1  # the marker every transaction puts (one operation past the caller's)

    def __init__(self, urls: str, prefix: str = "/virtua/", *, check: bool = True,
                 connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                 max_txn_ops: int = DEFAULT_MAX_TXN_OPS, tls: Credentials | None = None,
                 probe_in_background: bool = False) -> None:
        """tls: the client certificate of virtua's etcd CA (virtua.cluster.etcd_pki), for
        https:// endpoints: members are verified against that CA, and it is presented.
        probe_in_background: once a call failed, every call fails at once (no wait) until a
        thread of this store has seen the cluster answer a linearizable read again; for a
        caller on an event loop, which then waits on a sick cluster once per outage, not
        once per HOLD_DOWN (serve: its heartbeats, whose answers keep the guests alive)."""
        self.urls = parse_urls(urls)
        if max_txn_ops < 1:
            raise InvalidArgument(f"bad etcd transaction limit {max_txn_ops}: at least 1")
        # what the cluster's --max-txn-ops allows (etcd does not say): a longer transaction is
        # refused here, and the manager refuses an operation that would need one up front
        self.max_txn_ops = max_txn_ops
        if not prefix.startswith("/"):
            raise InvalidArgument(f"bad etcd key prefix {prefix!r}: it starts with /")
        https = [u for u in self.urls if u.startswith("https://")]
        if https and len(https) != len(self.urls):
            raise InvalidArgument("etcd endpoints are all https:// or all http://, not a mix")
        if https and tls is None:
            raise InvalidArgument("https:// etcd endpoints need the etcd client credentials (--etcd-tls DIR)")
        self.prefix = prefix.rstrip("/")
        self.read_timeout = read_timeout
        verify: Any = True
        if tls is not None:
            from virtua.cluster.etcd_pki import client_context

            try:
                verify = client_context(tls)
            except (OSError, ssl.SSLError) as e:
                raise InvalidArgument(f"cannot load the etcd client credentials in {tls.dir}: {e}") from e
        self.connect_timeout = connect_timeout
        self._verify = verify
        self._http = httpx.Client(timeout=httpx.Timeout(read_timeout, connect=connect_timeout), verify=verify)
        self._current = 0  # the endpoint that answered last
        self._lock = threading.RLock()
        self._depth = 0
        self._txn: _Txn | None = None
        self._down_until = 0.0
        self._down_said = ""
        self._probe_in_background = probe_in_background
        self._sick = False  # a call failed and the background probe has not seen etcd answer since
        self._probing = False  # a probe thread runs (it clears _sick once etcd answers)
        self._probe_lock = threading.Lock()
        self._closed = threading.Event()
        self._op_deadline: float | None = None  # the end of the public call under way (CALL_BUDGET)
        self._claim_lease: str | None = None
        self._claim_rev = 0  # the create revision of the claim this serve holds (0: none)
        self._claim_lost: str | None = None  # why this serve may not write any more
        self._claim_who: dict[str, Any] = {}
        self._claim_ttl = 10
        self._claim_mark = 0  # the claim's marker's mod revision as this store last moved it
        self._granted: str | None = None  # the lease this store was granted last for its claim
        self._id = secrets.token_hex(8)  # this process's marker key when it holds no claim
        self._marks: dict[str, int] = {}  # marker key -> its mod revision as last seen
        self._pending: tuple[str, int, str, str] | None = None  # a lost txn: marker, its rev, nonce, why
        self._fences: set[str] = set()  # tombstone nonces this store tried (a fence's answer may be lost too)
        self._outcomes: dict[str, bool] = {}  # settled lost txns: nonce -> applied
        if check:
            try:
                self.check()
            except BaseException:
                self.close()  # and its probe thread, which the failed check may have started
                raise

    # ------------------------------------------------------------------ transport

    @contextmanager
    def _op(self) -> Iterator[None]:
        """One public call, under the lock; for an event loop's store (probe_in_background)
        within CALL_BUDGET in all: members, waits for an election, settling a lost write."""
        with self._lock:
            if self._op_deadline is not None or not self._probe_in_background:
                yield
                return
            self._op_deadline = time.monotonic() + CALL_BUDGET
            try:
                yield
            finally:
                self._op_deadline = None

    def _held_down(self) -> bool:
        """etcd failed a call just now (HOLD_DOWN), or since (background probe): fail at once."""
        return self._sick or time.monotonic() < self._down_until

    def _went_down(self, message: str) -> None:
        self._down_until, self._down_said = time.monotonic() + HOLD_DOWN, message
        if self._probe_in_background and not self._closed.is_set():
            with self._probe_lock:
                self._sick = True
                if not self._probing:
                    self._probing = True
                    threading.Thread(target=self._probe_until_back, name="etcd-probe", daemon=True).start()

    def _came_back(self, *, prober: bool = False) -> None:
        with self._probe_lock:
            self._sick = False
            self._down_until = 0.0
            if prober:
                self._probing = False

    def _probe_until_back(self) -> None:
        """Until a member answers a linearizable read (a quorum agrees again), on a client
        of its own; then calls go to etcd again."""
        key = _b64(self.prefix + MARKER)
        with httpx.Client(timeout=httpx.Timeout(self.read_timeout, connect=self.connect_timeout),
                          verify=self._verify) as http:
            while not self._closed.wait(PROBE_EVERY):
                for i, url in enumerate(self.urls):
                    try:
                        r = http.post(f"{url}/v3/kv/range", json={"key": key, "count_only": True})
                    except httpx.HTTPError:
                        continue
                    if r.status_code == 200 and "header" in r.text:
                        log.info("etcd answers again (%s)", url)
                        self._current = i  # the calls go to a member that answers
                        self._came_back(prober=True)
                        return
        with self._probe_lock:
            self._probing = False

    def _call(self, path: str, body: dict[str, Any], *, idempotent: bool) -> dict[str, Any]:
        if self._held_down():
            raise Unavailable(self._down_said)
        start = time.monotonic()
        # the budget is an event loop's (serve's); a CLI waits for what each member may take
        budget = self._op_deadline or (start + CALL_BUDGET if self._probe_in_background else None)
        elected_by = start + ELECTION_WAIT if budget is None else min(start + ELECTION_WAIT, budget)
        while True:
            try:
                return self._request(path, body, idempotent=idempotent, deadline=budget)
            except _Electing as e:  # a member answered: a new leader is being elected
                if (idempotent or e.not_applied) and time.monotonic() + ELECTION_POLL < elected_by:
                    time.sleep(ELECTION_POLL)
                    continue
                self._went_down(e.message)
                if not (idempotent or e.not_applied):  # "leader changed" after proposing it
                    raise _AnswerLost(e.message + "; the write may or may not have been applied") from None
                raise Unavailable(e.message) from None
            except _OutOfTime:
                raise  # the caller's time, not etcd's health: no hold-down, no probe
            except Unavailable as e:
                self._went_down(e.message)
                raise

    def _request(self, path: str, body: dict[str, Any], *, idempotent: bool,
                 deadline: float | None = None) -> dict[str, Any]:
        """One request; on a connection failure the next endpoint. A request that was sent
        but got no answer goes to the next endpoint only if repeating it is harmless. By
        deadline (monotonic), if given: the members not tried by then are not."""
        failures: list[str] = []
        n = len(self.urls)
        answered = 0  # members reached that cannot answer (no quorum behind them)
        electing, not_applied = False, True
        first = self._current
        for i in range(n):
            url = self.urls[(first + i) % n]
            timeout: Any = httpx.USE_CLIENT_DEFAULT
            if deadline is not None:
                left = deadline - time.monotonic()
                if left < 0.05:
                    failures.append(f"no time left for etcd at {url} (a call's budget is {CALL_BUDGET:g} s)")
                    continue
                if left < self.read_timeout:
                    timeout = httpx.Timeout(left, connect=min(self.connect_timeout, left))
            try:
                r = self._http.post(f"{url}/v3/{path}", json=body, timeout=timeout)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                self._current = (first + i + 1) % n  # the next request starts past it (below)
                failures.append(f"etcd at {url} unreachable: {_reason(e)}")
                continue
            except httpx.TimeoutException:
                # the next request (the next call, or what settles a lost write) starts at the next
                # member: a silent one first in line used up every call's budget (two of five
                # silent: no call reached the three that answer), as it did a lost write's fence
                self._current = (first + i + 1) % n
                waited = self.read_timeout if timeout is httpx.USE_CLIENT_DEFAULT else timeout.read
                msg = f"{url} gave no answer within {waited:.3g} s"
                if not idempotent:
                    raise _AnswerLost(f"etcd has no quorum ({msg}); the write may or may not have been applied") from None
                failures.append(msg)
                answered += 1  # it is there, and cannot answer without a quorum
                continue
            except httpx.HTTPError as e:
                self._current = (first + i + 1) % n
                if not idempotent:  # connected and (maybe) sent, then cut: it may be applied
                    raise _AnswerLost(f"etcd at {url} cut the connection ({_reason(e)}); the write may or may "
                                      "not have been applied") from None
                failures.append(f"etcd at {url} unreachable: {_reason(e)}")
                continue
            self._current = (first + i) % n
            try:
                doc = r.json()
            except ValueError:
                doc = {}
            if r.status_code == 200 and isinstance(doc, dict):
                return doc
            message = str(doc.get("error") or doc.get("message") or r.text[:200]) if isinstance(doc, dict) else r.text[:200]
            if any(s in message for s in _NO_QUORUM) or r.status_code == 503:
                failures.append(f"{url}: {message}")
                answered += 1
                electing = electing or any(s in message for s in _ELECTING)
                not_applied = not_applied and "no leader" in message
                if idempotent:
                    continue
                if not electing and not any(s in message for s in _REFUSED):  # maybe proposed: who knows
                    raise _AnswerLost(_no_quorum(failures, answered, n, electing, not_applied).message)
                raise _no_quorum(failures, answered, n, electing, not_applied)
            if "too large" in message:
                raise NoSpace(f"etcd refused the request as too large ({message}): documents are at most "
                              "etcd's --max-request-bytes (1.5 MiB by default)")
            if "too many operations" in message:
                raise InvalidArgument(f"etcd refused the transaction ({message}): etcd's --max-txn-ops "
                                      "(128 by default) bounds the keys one transaction reads and writes")
            raise VirtuaError(f"etcd at {url} refused /v3/{path}: {message}")
        if answered:
            raise _no_quorum(failures, answered, n, electing, not_applied and answered > 0)
        if all(f.startswith("no time left") for f in failures):
            raise _OutOfTime("; ".join(failures))
        raise Unavailable("; ".join(failures))

    def check(self) -> None:
        """That the cluster answers a linearizable read (a quorum agrees), else Unavailable."""
        self._range_page(self._full("/"), prefix_end(self._full("/").encode()), 1, None)

    # ------------------------------------------------------------------ keys

    def _full(self, key: str) -> str:
        return self.prefix + (key if key.startswith("/") else "/" + key)

    def _short(self, full: bytes) -> str:
        return full.decode()[len(self.prefix):]

    def _range_page(self, key: str | bytes, end: bytes | None, limit: int, revision: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(key)}
        if end is not None:
            body["range_end"] = _b64(end)
        if limit:
            body["limit"] = limit
        if revision:
            body["revision"] = revision
        return self._call("kv/range", body, idempotent=True)

    def _get_raw(self, key: str) -> tuple[dict[str, Any] | None, int]:
        doc = self._range_page(self._full(key), None, 0, None)
        kvs = doc.get("kvs") or []
        if not kvs:
            return None, 0
        return json.loads(_unb64(kvs[0].get("value", ""))), int(kvs[0]["mod_revision"])

    def _range_raw(self, prefix: str) -> tuple[list[tuple[str, dict[str, Any], int]], int]:
        """Every key under prefix, in key order, read at one revision (page after page)."""
        start = self._full(prefix).encode()
        end = prefix_end(start)
        out: list[tuple[str, dict[str, Any], int]] = []
        revision: int | None = None
        key: bytes = start
        while True:
            doc = self._range_page(key, end, PAGE, revision)
            if revision is None:
                revision = int(doc["header"]["revision"])
            kvs = doc.get("kvs") or []
            for kv in kvs:
                out.append((self._short(_unb64(kv["key"])), json.loads(_unb64(kv.get("value", ""))),
                            int(kv["mod_revision"])))
            if not doc.get("more") or not kvs:
                return out, revision
            key = _unb64(kvs[-1]["key"]) + b"\0"

    # ------------------------------------------------------------------ StateStore

    def get(self, key: str) -> dict[str, Any] | None:
        with self._op():
            t = self._txn
            if t is not None and key in t.writes:
                return copy.deepcopy(t.writes[key])  # the caller's changes are not the txn's
            value, rev = self._get_raw(key)
            if t is not None:
                t.read_revs.setdefault(self._full(key), rev)
            return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        data = json.dumps(value, sort_keys=True)
        with self._op():
            if self._txn is not None:
                self._txn.writes[key] = json.loads(data)  # a copy: later changes to value are not written
                return
            # a transaction of one, conditional on the marker like every write: a plain put
            # retried on another member, or held by a frozen one, could apply late, over a
            # later write that was acknowledged
            self._commit(_Txn(writes={key: json.loads(data)}))

    def delete(self, key: str) -> None:
        with self._op():
            if self._txn is not None:
                self._txn.writes[key] = None
                return
            self._commit(_Txn(writes={key: None}))

    def range(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        with self._op():
            rows, revision = self._range_raw(prefix)
            rows = [r for r in rows if not r[0].startswith("/.")]  # the claim, the markers: the store's own
            t = self._txn
            if t is None:
                return [(k, v) for k, v, _ in rows]
            full = self._full(prefix)
            t.ranges.setdefault(full, revision)
            for k, _, rev in rows:
                t.read_revs.setdefault(self._full(k), rev)
            merged = {k: v for k, v, _ in rows}
            for k, w in t.writes.items():
                if k.startswith(prefix):
                    if w is None:
                        merged.pop(k, None)
                    else:
                        merged[k] = w
            return sorted((k, copy.deepcopy(v)) for k, v in merged.items())

    @contextmanager
    def txn(self) -> Iterator[None]:
        with self._op():
            outer = self._depth == 0
            if outer:
                self._txn = _Txn()
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._txn = None
                raise
            self._depth -= 1
            if outer:
                t, self._txn = self._txn, None
                assert t is not None
                self._commit(t)

    def _commit(self, t: _Txn) -> None:
        if not t.writes:
            return  # reads only: nothing to agree on
        if self._claim_lost is not None:
            raise Busy(self._claim_lost)
        compare: list[dict[str, Any]] = [
            {"key": _b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": rev}
            for k, rev in sorted(t.read_revs.items())
        ]
        for p, rev in sorted(t.ranges.items()):  # nothing new or changed under a prefix ranged over
            compare.append({"key": _b64(p), "range_end": _b64(prefix_end(p.encode())),
                            "target": "MOD", "result": "LESS", "mod_revision": rev + 1})
        success = [
            {"request_put": {"key": _b64(self._full(k)), "value": _b64(json.dumps(v, sort_keys=True))}}
            if v is not None else {"request_delete_range": {"key": _b64(self._full(k))}}
            for k, v in t.writes.items()
        ]
        longest = max(len(compare) + len(self._claim_compare()), len(success)) + 1  # and the marker (below)
        if longest > self.max_txn_ops:
            raise InvalidArgument(
                f"etcd transaction of {longest} operations: etcd's --max-txn-ops ({self.max_txn_ops} here) bounds "
                "the keys one transaction reads and writes; start etcd with a larger --max-txn-ops and serve "
                "with the same --etcd-max-txn-ops")
        for _ in range(2):
            if self._send_commit([*compare, *self._claim_compare()], success):
                return
            if not self._check_claim():  # True: the claim had gone, and is this serve's again
                break
        changed = sorted(self._short(k.encode()) for k in t.read_revs) + sorted(
            self._short(p.encode()) + "*" for p in t.ranges)
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        if not changed:
            raise StoreConflict("etcd write not applied: its condition failed")
        raise StoreConflict(f"etcd transaction not applied: a key it read changed meanwhile ({shown})")

    def _send_commit(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> bool:
        """One transaction on this serve's marker: True if applied, False if its condition failed."""
        for attempt in range(2):
            mark, mark_rev = self._marker()  # a lost write of before is settled first
            nonce = secrets.token_hex(12)
            body = {
                "compare": [*compare, {"key": _b64(mark), "target": "MOD", "result": "EQUAL", "mod_revision": mark_rev}],
                "success": [*success, {"request_put": {"key": _b64(mark), "value": _b64(json.dumps({"nonce": nonce}))}}],
                "failure": [{"request_range": {"key": _b64(mark)}}],
            }
            try:
                doc = self._send_txn(body)
            except _AnswerLost as e:
                self._pending = (mark, mark_rev, nonce, e.message)
                if self._settle_pending():
                    return True  # it was applied: the caller's write is there
                raise Unavailable(f"etcd transaction not applied ({e.message}): its answer was lost, and etcd "
                                  "confirmed it was not applied and now never can be") from None
            if doc.get("succeeded"):
                self._own_mark(mark, int(doc["header"]["revision"]))
                return True
            held, held_rev = _marker_in(doc)
            if held == nonce:  # sent again after "no leader" and an earlier copy was applied after all
                self._own_mark(mark, held_rev)
                return True
            if held_rev == mark_rev or attempt:
                break
            # the marker moved though this store wrote nothing since: another store on the same
            # marker (a serve before this one on the prefix). The write was not applied: once more
            if held_rev:
                self._marks[mark] = held_rev
            else:  # gone: made again (a write is never conditional on its absence)
                self._marks.pop(mark, None)
        return False

    # ------------------------------------------------------------------ a lost answer

    def _send_txn(self, body: dict[str, Any]) -> dict[str, Any]:
        """kv/txn, with two failpoints for tests: VIRTUA_ETCD_LOSE_ANSWER=N loses the answer
        of this process's Nth state transaction after etcd applied it (if it could),
        VIRTUA_ETCD_DROP_TXN=N drops the Nth before it is sent; both then look like a read
        timeout."""
        global _txns_sent
        _txns_sent += 1
        n = str(_txns_sent)
        if os.environ.get("VIRTUA_ETCD_DROP_TXN") == n:
            raise _AnswerLost(f"failpoint VIRTUA_ETCD_DROP_TXN={n}: the transaction was not sent; "
                              "the write may or may not have been applied")
        doc = self._call("kv/txn", body, idempotent=False)
        if os.environ.get("VIRTUA_ETCD_LOSE_ANSWER") == n:
            raise _AnswerLost(f"failpoint VIRTUA_ETCD_LOSE_ANSWER={n}: the answer was lost; "
                              "the write may or may not have been applied")
        return doc

    def _marker(self) -> tuple[str, int]:
        """This serve's marker key and its mod revision (a lost txn of before settled first)."""
        if self._pending is not None:
            if self._held_down():  # it just failed: not again yet (no wait per write)
                raise Unavailable(f"etcd transaction not sent (so not applied): an earlier one's outcome is "
                                  f"still being settled: etcd is away ({self._down_said})")
            try:
                self._settle_pending(0)  # one attempt: the caller's own write has not been sent
            except OutcomeUnknown as e:
                raise Unavailable(f"etcd transaction not sent (so not applied): an earlier one's outcome is "
                                  f"still being settled: {e.message}") from None
        key = self.prefix + (MARKER if self._claim_rev else f"{MARKER}/{self._id}")
        if key not in self._marks:  # the claim's marker may be a predecessor's (same prefix)
            self._marks[key] = self._make_marker(key)
        return key, self._marks[key]

    def _own_mark(self, key: str, rev: int) -> None:
        """The marker as this store itself moved it (a write, a fence, the claim): under the
        claim, what a re-take checks nobody moved since. Not so a marker found moved by
        another store (_send_commit's "once more"): that may be a serve that had the prefix
        while this one's claim had lapsed."""
        self._marks[key] = rev
        if key == self.prefix + MARKER:
            self._claim_mark = rev

    def _make_marker(self, key: str) -> int:
        """The marker's mod revision, creating it first if absent (create-only, alone): a
        write is never conditional on the marker being absent, since the marker can be
        absent again (a store without a claim removes its own on close) and a write lost
        on that condition would then apply. Repeating the creation is harmless."""
        doc = self._call("kv/txn", {
            "compare": [{"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(json.dumps({"nonce": "created"}))}}],
            "failure": [{"request_range": {"key": _b64(key)}}],
        }, idempotent=True)
        if doc.get("succeeded"):
            return int(doc["header"]["revision"])
        _, rev = _marker_in(doc)
        if not rev:
            raise VirtuaError(f"etcd answered a transaction on {key} without it")
        return rev

    def settle(self, txn: str | None = None, *, wait: float | None = None) -> bool | None:
        """Whether the transaction `txn` (OutcomeUnknown.txn), whose answer was lost, was
        applied: True or False for good once etcd answers (OutcomeUnknown while it does
        not); None if this store never sent it (another process did) or has forgotten it.
        Without txn: settles the pending one, if any. wait: seconds to keep trying
        (RESOLVE_WAIT by default; 0: one attempt, for a caller on the event loop)."""
        with self._op():
            if self._pending is not None and (txn is None or self._pending[2] == txn):
                if wait == 0 and self._held_down():  # it just failed: not again yet
                    raise OutcomeUnknown(f"etcd is away ({self._down_said}): the outcome of transaction "
                                         f"{self._pending[2]} is not settled yet", txn=self._pending[2])
                return self._settle_pending(RESOLVE_WAIT if wait is None else wait)
            return None if txn is None else self._outcomes.get(txn)

    def _settle_pending(self, wait: float = RESOLVE_WAIT) -> bool:
        """Settle the lost transaction: fence the marker at the revision the txn was
        conditional on (then it was not applied, and never can be), or find its nonce there
        (applied). Raises OutcomeUnknown if etcd does not answer within RESOLVE_WAIT."""
        assert self._pending is not None
        key, rev, nonce, why = self._pending
        began = time.monotonic()
        deadline = began + wait
        if self._op_deadline is not None:
            deadline = min(deadline, self._op_deadline)
        last = why
        while True:
            fence = "fence-" + secrets.token_hex(8)
            self._fences.add(fence)
            body = {"compare": [{"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": rev}],
                    "success": [{"request_put": {"key": _b64(key), "value": _b64(json.dumps({"nonce": fence}))}}],
                    "failure": [{"request_range": {"key": _b64(key)}}]}
            try:
                # a compare-and-swap: safe to repeat
                doc = self._request("kv/txn", body, idempotent=True, deadline=self._op_deadline)
            except Unavailable as e:
                last = e.message
                if not isinstance(e, _OutOfTime):
                    self._went_down(e.message)
                if time.monotonic() >= deadline:
                    raise OutcomeUnknown(
                        f"etcd did not answer a transaction ({why}) and stayed unreachable for "
                        f"{time.monotonic() - began:.2g} s "
                        f"while its outcome was checked ({last}): it may or may not have been applied; the next "
                        f"write to etcd settles it (marker {key}, nonce {nonce})", txn=nonce) from None
                time.sleep(ELECTION_POLL * 2)
                continue
            if doc.get("succeeded"):
                return self._settled(key, int(doc["header"]["revision"]), nonce, False)
            held, held_rev = _marker_in(doc)
            if held == nonce:
                return self._settled(key, held_rev, nonce, True)
            if held in self._fences:  # an earlier fence of this store, whose answer was lost
                return self._settled(key, held_rev, nonce, False)
            self._pending = None
            self._marks.pop(key, None)
            raise OutcomeUnknown(f"etcd did not answer a transaction ({why}), and its marker {key} was changed "
                                 "by another writer meanwhile: whether it was applied cannot be told", txn=nonce)

    def _settled(self, key: str, rev: int, nonce: str, applied: bool) -> bool:
        self._own_mark(key, rev)
        self._pending = None
        self._fences.clear()  # a fence still in flight is conditional on the old revision: it cannot apply
        self._came_back()  # etcd answered
        self._outcomes[nonce] = applied
        while len(self._outcomes) > KEEP_OUTCOMES:
            del self._outcomes[next(iter(self._outcomes))]
        return applied

    # ------------------------------------------------------------------ one manager per prefix

    def claim(self, who: dict[str, Any], ttl: int, *, stale: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """Make this process the one manager of the prefix: the key PREFIX/.claim, created
        only if absent, on an etcd lease of `ttl` seconds that `keep_claim` renews (a killed
        serve's claim goes when its lease runs out). Busy if another serve holds it, or
        holds a prefix inside this one or around it (its keys would be in this one's ranges).
        stale(holder): whether the prefix's own claim is one this process may take over (a
        killed serve of the same home on the same host, whose home lock this one now holds)."""
        with self._op():
            parts = [p for p in self.prefix.split("/") if p]
            for i in range(len(parts)):  # around: /, /a for /a/b
                around = "".join("/" + p for p in parts[:i])
                rows = self._range_page((around + CLAIM).encode(), None, 0, None).get("kvs") or []
                if rows:
                    raise self._busy(around + "/", rows[0])
            start = (self.prefix + "/").encode()
            doc = self._call("kv/range", {"key": _b64(start), "range_end": _b64(prefix_end(start)), "keys_only": True},
                             idempotent=True)
            for kv in doc.get("kvs") or []:  # inside: /a/b/.claim for /a
                key = _unb64(kv["key"]).decode(errors="replace")
                if key.endswith(CLAIM) and key != self.prefix + CLAIM:
                    inner = self._range_page(key, None, 0, None).get("kvs") or []
                    if inner:
                        raise self._busy(key[: -len(CLAIM)] + "/", inner[0])
            self._claim_who, self._claim_ttl = who, ttl
            try:
                self._take_claim()
            except _Taken as e:
                if stale is None or not stale(e.holder):
                    raise
                # its predecessor's claim, left by a kill: gone at once rather than when its lease runs out
                self._call("kv/txn", {"compare": [{"key": _b64(self.prefix + CLAIM), "target": "CREATE",
                                                   "result": "EQUAL", "create_revision": e.revision}],
                                      "success": [{"request_delete_range": {"key": _b64(self.prefix + CLAIM)}}]},
                           idempotent=True)
                self._take_claim()

    def _claim_compare(self) -> list[dict[str, Any]]:
        """While this serve holds the claim, every write is on condition that it still does
        (the claim key as it created it): a serve that stalled past its lease and was
        replaced writes nothing, even before its next renewal tells it so."""
        if not self._claim_rev:
            return []
        return [{"key": _b64(self.prefix + CLAIM), "target": "CREATE", "result": "EQUAL",
                 "create_revision": self._claim_rev}]

    def _check_claim(self) -> bool:
        """Busy if the claim this serve made is another serve's now; from then on every
        write is refused (this serve must stop managing). A claim gone with its lease is
        taken again (_retake_claim): True. So is one a re-take whose answer was lost made
        (the claim on the lease this store was granted last): adopted, True."""
        if self._claim_lost is not None:
            raise Busy(self._claim_lost)
        if not self._claim_rev:
            return False
        kvs = self._range_page(self.prefix + CLAIM, None, 0, None).get("kvs") or []
        if kvs and int(kvs[0].get("create_revision", 0)) == self._claim_rev:
            return False
        self._claim_lease = None
        if kvs and self._granted is not None and str(kvs[0].get("lease")) == self._granted:
            # this store's own re-take, whose answer was lost: the marker moved in it
            self._claim_lease, self._claim_rev = self._granted, int(kvs[0]["create_revision"])
            self._own_mark(self.prefix + MARKER, self._claim_rev)
            return True
        if not kvs:
            self._retake_claim()
            return True
        self._claim_lost = "this serve no longer manages the cluster state: " + self._busy(
            self.prefix + "/", kvs[0]).message
        raise Busy(self._claim_lost)

    def _retake_claim(self) -> None:
        """The claim went with its lease (etcd away longer than it, this serve stalled or
        cut off): take it again, unless another serve has it by now, or had it meanwhile
        and left (the marker moved: every claim and every write of a claim holder moves
        it). Busy then: this one stops managing. Stopping after any lapse stopped serve
        (and every guest's disk) after any etcd outage longer than the claim's TTL.
        etcd failing the re-take (Unavailable) leaves this serve bound to its old claim:
        its writes still fail their condition on it, and the next renewal or write tries
        again (it used to go on writing with no claim condition, and stop renewing)."""
        old, self._claim_lease = self._claim_rev, None
        if self._pending is not None:  # the re-take moves the marker a lost write is conditional on
            try:
                self._settle_pending(0)
            except OutcomeUnknown as e:
                raise Unavailable(f"the claim on etcd prefix {self.prefix}/ is not taken again yet: {e.message}") from None
        try:
            self._take_claim(after=old)
        except Busy as e:
            self._claim_lost = "this serve no longer manages the cluster state: " + e.message
            raise Busy(self._claim_lost) from None
        log.warning("took the claim on etcd prefix %s/ again: its lease ran out", self.prefix)

    def _take_claim(self, after: int | None = None) -> None:
        """Create the claim on a new lease, and move the marker in the same transaction (so
        a serve whose claim lapsed can tell another serve had it meanwhile). after: the
        create revision of this serve's lapsed claim: only if the marker has not moved since
        this serve last moved it (_claim_mark), else Busy."""
        lease = str(self._call("lease/grant", {"TTL": self._claim_ttl}, idempotent=False)["ID"])
        self._granted = lease
        key = _b64(self.prefix + CLAIM)
        mark = self.prefix + MARKER
        compare = [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": 0}]
        if after is not None:  # not moved since this serve last moved it (a serve that had the prefix did)
            compare.append({"key": _b64(mark), "target": "MOD", "result": "EQUAL", "mod_revision": self._claim_mark})
        doc = self._call("kv/txn", {
            "compare": compare,
            "success": [{"request_put": {"key": key, "value": _b64(json.dumps(self._claim_who)), "lease": lease}},
                        {"request_put": {"key": _b64(mark), "value": _b64(json.dumps({"nonce": "claimed-" + lease}))}}],
            "failure": [{"request_range": {"key": key}}],
        }, idempotent=False)
        if not doc.get("succeeded"):
            with contextlib.suppress(VirtuaError):
                self._call("lease/revoke", {"ID": lease}, idempotent=True)
            kvs = ((doc.get("responses") or [{}])[0].get("response_range") or {}).get("kvs") or []
            if not kvs:  # absent, but the marker moved: another serve claimed the prefix meanwhile, and left
                raise Busy(f"another virtua serve managed the cluster state under etcd prefix {self.prefix}/ "
                           "after this one's claim lapsed (and has stopped since): this one's view is stale")
            busy = self._busy(self.prefix + "/", kvs[0])
            raise _Taken(busy.message, _holder(kvs[0]), int(kvs[0].get("create_revision", 0)))
        self._claim_lease = lease
        self._claim_rev = int(doc["header"]["revision"])  # the claim key's create revision
        self._own_mark(mark, self._claim_rev)  # moved in the same transaction

    def keep_claim(self) -> None:
        """Renew the claim; a claim whose lease ran out (etcd away longer than it) is taken
        again, unless another serve has it by now (Busy: this one must stop managing)."""
        with self._op():
            if self._claim_lost is not None:  # a write found it taken: this serve stops
                raise Busy(self._claim_lost)
            if self._claim_lease is None:
                if self._claim_rev:  # a re-take etcd failed: again
                    self._check_claim()
                return
            doc = self._call("lease/keepalive", {"ID": self._claim_lease}, idempotent=True)
            if int((doc.get("result") or {}).get("TTL") or 0) <= 0:
                self._check_claim()  # gone with its lease: taken again; another serve's: Busy

    def release_claim(self) -> None:
        with self._op():
            lease, self._claim_lease = self._claim_lease, None
            self._claim_rev = 0
            if lease is not None:
                with contextlib.suppress(VirtuaError):
                    self._call("lease/revoke", {"ID": lease}, idempotent=True)

    def _busy(self, prefix: str, kv: dict[str, Any]) -> Busy:
        who = _holder(kv)
        said = ", ".join(f"{k} {who[k]}" for k in ("host", "pid", "home") if k in who) or "unknown"
        return Busy(f"another virtua serve ({said}) manages the cluster state under etcd prefix {prefix or '/'}, "
                    f"which {'is' if prefix.rstrip('/') == self.prefix else 'overlaps'} this one's "
                    f"({self.prefix or ''}/): stop it first, or give this serve a prefix of its own (--etcd-prefix)")

    def close(self) -> None:
        self._closed.set()
        # a store without a claim: its marker goes with it (safe: no write was ever conditional
        # on its absence, so none still in flight can apply once it is gone)
        own = self.prefix + f"{MARKER}/{self._id}"
        if self._marks.pop(own, None) and self._pending is None and not self._http.is_closed:
            with contextlib.suppress(VirtuaError):
                self._request("kv/deleterange", {"key": _b64(own)}, idempotent=True)
        self._http.close()


class _Taken(Busy):
    """The prefix's claim is another's: who holds it, and its create revision."""

    def __init__(self, message: str, holder: dict[str, Any], revision: int) -> None:
        super().__init__(message)
        self.holder, self.revision = holder, revision


def _marker_in(doc: dict[str, Any]) -> tuple[str | None, int]:
    """The nonce and mod revision of the marker in a failed txn's answer (its failure range)."""
    kvs = ((doc.get("responses") or [{}])[0].get("response_range") or {}).get("kvs") or []
    if not kvs:
        return None, 0
    nonce = _holder(kvs[0]).get("nonce")
    return (nonce if isinstance(nonce, str) else None), int(kvs[0].get("mod_revision", 0))


def _holder(kv: dict[str, Any]) -> dict[str, Any]:
    try:
        who = json.loads(_unb64(kv.get("value", ""))) if kv.get("value") else {}
    except ValueError:
        return {}
    return who if isinstance(who, dict) else {}


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text.replace("[Errno 111] ", "").strip()
