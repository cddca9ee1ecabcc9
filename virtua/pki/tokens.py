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

from virtua.errors import InvalidArgument, Unauthenticated
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

    def create(self, ttl: float) -> tuple[JoinToken, float]:
        if not 0 < ttl <= MAX_TTL:
            raise InvalidArgument(f"bad --ttl {ttl:g} s: must be more than 0 and at most 7 days")
        token = JoinToken(secrets.token_hex(8), secrets.token_hex(32), self.ca_fingerprint)
        expires = time.time() + ttl
        with self._lock:
            tokens = self._load()
            tokens[token.id] = {"sha256": _hash(token.secret), "expires": expires}
            self._save(tokens)
        return token, expires

    def consume(self, text: str) -> str:
        """Spend a token (it never works again); returns its id. Raises Unauthenticated
        for an unknown, used, expired or wrong one."""
        token = parse_token(text)
        with self._lock:
            tokens = self._load()
            rec = tokens.pop(token.id, None)
            if rec is None:
                raise Unauthenticated(f"join token {token.id} is unknown or already used")
            if not hmac.compare_digest(str(rec["sha256"]), _hash(token.secret)):
                tokens[token.id] = rec  # a wrong secret does not burn the right one
                raise Unauthenticated(f"join token {token.id}: wrong secret")
            self._save(tokens)
            if float(rec["expires"]) <= time.time():
                raise Unauthenticated(f"join token {token.id} expired")
        return token.id
