"""One-time join tokens: `virtua host join-token` makes one, an agent spends it once to
get its certificate.

A token reads ``vjt1.ID.SECRET.CAFP``: ID names the stored record, SECRET is checked
against its stored sha256 (the secret itself is never stored), and CAFP is the sha256 of
the cluster CA certificate, which the agent pins before it sends the secret anywhere
(kubeadm's --discovery-token-ca-cert-hash, inside the token).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from virtua.errors import Forbidden, InvalidArgument, Unauthenticated
from virtua.pki.files import write_private

PREFIX = "vjt1"
_TOKEN = re.compile(r"vjt1\.([0-9a-f]{16})\.([0-9a-f]{64})\.([0-9a-f]{64})")
MAX_TTL = 7 * 86400.0


@dataclass(frozen=True)
class JoinToken:
    id: str
    secret: str
    ca_fingerprint: str

    def __str__(self) -> str:
        return f"{PREFIX}.{self.id}.{self.secret}.{self.ca_fingerprint}"


def parse_token(text: str) -> JoinToken:
    m = _TOKEN.fullmatch(text.strip())
    if m is None:
        raise InvalidArgument("bad join token: expected vjt1.ID.SECRET.CA-SHA256 (from `virtua host join-token`)")
    return JoinToken(m.group(1), m.group(2), m.group(3))


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class JoinTokens:
    """The manager's store of outstanding tokens (a 0600 JSON file)."""

    def __init__(self, path: Path, ca_fingerprint: str) -> None:
        self.path = path
        self.ca_fingerprint = ca_fingerprint
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict[str, float | str]]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def _save(self, tokens: dict[str, dict[str, float | str]]) -> None:
        now = time.time()
        live = {k: v for k, v in tokens.items() if float(v["expires"]) > now}
        write_private(self.path, json.dumps(live).encode())

    def create(self, ttl: float, name: str | None = None) -> tuple[JoinToken, float]:
        """A new token; with a name it joins that host only (and may take over the
        record of a host the administrator added), without one any new host."""
        if not 0 < ttl <= MAX_TTL:
            raise InvalidArgument(f"bad --ttl {ttl:g} s: must be more than 0 and at most 7 days")
        token = JoinToken(secrets.token_hex(8), secrets.token_hex(32), self.ca_fingerprint)
        expires = time.time() + ttl
        rec: dict[str, float | str] = {"sha256": _hash(token.secret), "expires": expires}
        if name is not None:
            rec["name"] = name
        with self._lock:
            tokens = self._load()
            tokens[token.id] = rec
            self._save(tokens)
        return token, expires

    def consume(self, text: str, name: str, *, existing: bool) -> str:
        """Spend a token for host `name` (it never works again); returns its id. Raises
        Unauthenticated for an unknown, used, expired or wrong one, Forbidden (and keeps
        the token) when it is bound to another name, or when `existing` (a host record
        without a certificate is there already) and it is bound to no name."""
        token = parse_token(text)
        with self._lock:
            tokens = self._load()
            rec = tokens.get(token.id)
            if rec is None:
                raise Unauthenticated(f"join token {token.id} is unknown or already used")
            if not hmac.compare_digest(str(rec["sha256"]), _hash(token.secret)):
                raise Unauthenticated(f"join token {token.id}: wrong secret")  # the right one still works
            if float(rec["expires"]) <= time.time():
                tokens.pop(token.id)
                self._save(tokens)
                raise Unauthenticated(f"join token {token.id} expired")
            bound = rec.get("name")
            if bound is not None and bound != name:
                raise Forbidden(f"join token {token.id} is for host {bound}, not {name}")
            if bound is None and existing:
                raise Forbidden(
                    f"host {name} is known already: only a token made for it "
                    f"(`virtua host join-token {name}`) may join as it"
                )
            tokens.pop(token.id)
            self._save(tokens)
        return token.id
