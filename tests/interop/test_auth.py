"""The authenticated control plane, against a real `virtua serve` and a real agent on
loopback: every refusal (no certificate, foreign CA, expired, revoked, a host's
certificate on an admin operation, plaintext on the TLS port, a reused join token) is a
clear error, a log line and no change; each with the authorized client as control."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli_support import free_port
from virtua.pki.ca import ClusterCA
from virtua.pki.credentials import MANAGER, Credentials, PeerRule
from virtua.pki.files import write_private

pytestmark = pytest.mark.interop



class Plane:
    """virtua serve (no local agent) and one joined agent, both on 127.0.0.1."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home = tmp / "home"
        self.env = dict(os.environ, VIRTUA_HOME=str(self.home), COLUMNS="200")
        self.api_port, self.agent_port, self.nbd_port = free_port(), free_port(), free_port()
        self.api = f"https://127.0.0.1:{self.api_port}"
        self.log = tmp / "serve.log"
        self.cli("pool", "create", "p", "--capacity", "1G")
        self.cli("volume", "create", "p/victim", "--size", "8M")
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"127.0.0.1:{self.nbd_port}",
             "--api-listen", f"127.0.0.1:{self.api_port}"],
            env=self.env, stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True,
        )
        assert self.serve.stdout is not None
        assert self.serve.stdout.readline().startswith("VIRTUA_READY"), self.log.read_text()
        self.agent_home = tmp / "agent"
        self.agent: subprocess.Popen[str] | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "virtua.cli", *args], env=self.env, capture_output=True, text=True,
                           timeout=120)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    def start_agent(self, name: str, token_file: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "--home", str(self.agent_home), "agent", "--name", name,
             "--listen", f"127.0.0.1:{self.agent_port}", "--manager", self.api, "--no-network",
             "--join-token-file", str(token_file)],
            env=self.env, stdout=open(self.tmp / f"agent-{name}.log", "a"), stderr=subprocess.STDOUT, text=True,
        )

    @property
    def pki(self) -> Path:
        return self.home / "pki"

    def client(self, creds: Credentials | None, base: str | None = None, peer: PeerRule = MANAGER) -> httpx.Client:
        ctx = creds.client_context(peer) if creds else ssl.create_default_context(cafile=str(self.pki / "ca-cert.pem"))
        return httpx.Client(base_url=base or self.api, verify=ctx, timeout=20)

    def log_has(self, text: str, timeout: float = 5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log.read_text():
                return True
            time.sleep(0.1)
        return False

    def volumes(self) -> list[str]:
        return [v["name"] for v in json.loads(self.cli("volume", "list", "--json").stdout)]

    def close(self) -> None:
        for p in (self.agent, self.serve):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)


def wait_for(cond, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    p = Plane(tmp_path_factory.mktemp("auth"))
    try:
        token = p.tmp / "a1.token"
        p.cli("host", "join-token", "--ttl", "10m", "--output", str(token))
        p.agent = p.start_agent("a1", token)
        wait_for(lambda: any(h["name"] == "a1" and h["alive"] for h in json.loads(p.cli("host", "list", "--json").stdout)),
                 "agent a1 to join and register")
        yield p
    finally:
        p.close()


def beat(c: httpx.Client) -> httpx.Response:
    """A heartbeat as a1, whose own agent beats every second too: the manager takes one per
    0.25 s per host and answers 423 (Busy) to the other."""
    for _ in range(10):
        r = c.post("/v1/hosts/a1/heartbeat", json={"vms": []})
        if r.status_code != 423:
            return r
        time.sleep(0.1)
    return r


def ca_of(p: Plane) -> ClusterCA:
    return ClusterCA.ensure(p.pki, manager_sans=[])  # loads it; issues nothing new


def creds_from(tmp: Path, ca_pem: bytes, cert: bytes, key: bytes) -> Credentials:
    c = Credentials(tmp)
    write_private(c.ca, ca_pem)
    write_private(c.cert, cert)
    write_private(c.key, key)
    return c


def test_secrets_are_root_only_and_the_socket_is_0600(plane: Plane) -> None:
    for path in [plane.pki, plane.agent_home / "pki"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        for f in path.rglob("*"):
            assert stat.S_IMODE(f.stat().st_mode) in (0o600, 0o700), f
    assert stat.S_IMODE((plane.home / "virtua.sock").stat().st_mode) == 0o600
    assert stat.S_IMODE((plane.home / "nbd.sock").stat().st_mode) == 0o600


def test_no_certificate_gets_401_and_nothing_runs(plane: Plane) -> None:
    with plane.client(None) as c:
        r = c.delete("/v1/pools/p/volumes/victim")
    assert r.status_code == 401 and r.json()["error"] == "Unauthenticated"
    assert "client certificate" in r.json()["message"]
    assert plane.log_has("refused DELETE /v1/pools/p/volumes/victim from 127.0.0.1:"), "the refusal is logged"
    assert "p/victim" in plane.volumes(), "nothing ran"
    # control: the admin certificate over TCP, through the CLI
    r2 = plane.cli("--api", plane.api, "--cert", str(plane.pki / "admin"), "volume", "list", "--json")
    assert "p/victim" in r2.stdout


def test_plaintext_http_on_the_tls_port_is_refused_and_logged(plane: Plane) -> None:
    with pytest.raises(httpx.HTTPError), httpx.Client(timeout=10) as c:
        # a POST: OpenSSL names plaintext HTTP by its first word (GET, POST, HEAD, PUT), not DELETE
        c.post(f"http://127.0.0.1:{plane.api_port}/v1/pools/p/volumes/victim/reset", json={"force": True})
    assert plane.log_has("refused TLS from 127.0.0.1:") and plane.log_has("plaintext HTTP on the TLS port")
    assert "p/victim" in plane.volumes()


def test_foreign_ca_and_expired_certificates_fail_the_handshake(plane: Plane, tmp_path: Path) -> None:
    foreign = ClusterCA.ensure(tmp_path / "foreign", manager_sans=["127.0.0.1"])
    bad = creds_from(tmp_path / "f", (plane.pki / "ca-cert.pem").read_bytes(), *foreign.issue("admin", "admin"))
    with pytest.raises(httpx.HTTPError), plane.client(bad) as c:
        c.delete("/v1/pools/p/volumes/victim")
    assert plane.log_has("unable to get local issuer certificate"), "the foreign CA's refusal is logged"
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    expired = creds_from(tmp_path / "e", (plane.pki / "ca-cert.pem").read_bytes(),
                         *ca_of(plane).issue("admin", "admin", not_after=past))
    with pytest.raises(httpx.HTTPError), plane.client(expired) as c:
        c.delete("/v1/pools/p/volumes/victim")
    assert plane.log_has("certificate has expired")
    assert "p/victim" in plane.volumes(), "nothing ran"
    with plane.client(Credentials(plane.pki / "admin")) as c:  # control
        assert c.get("/v1/pools").status_code == 200


def test_a_host_certificate_may_not_run_admin_operations(plane: Plane) -> None:
    host = Credentials(plane.agent_home / "pki")
    with plane.client(host) as c:
        r = c.request("DELETE", "/v1/pools/p/volumes/victim", json={"force": True})
        assert r.status_code == 403 and "admin operations" in r.json()["message"]
        # the operations on a host, itself or one called like the agent's own endpoint
        for method, path in [("DELETE", "/v1/hosts/a1"), ("POST", "/v1/hosts/a1/drain"), ("GET", "/v1/hosts/a1"),
                             ("GET", "/v1/hosts/register"), ("DELETE", "/v1/hosts/register"),
                             ("GET", "/v1/templates/x"), ("GET", "/v1/openapi.json")]:
            r = c.request(method, path)
            assert r.status_code == 403 and "admin operations" in r.json()["message"], (method, path, r.text)
        r = c.post("/v1/hosts/other/heartbeat", json={"vms": []})
        assert r.status_code == 403, "a host heartbeats as itself only"
        r = c.post("/v1/hosts/register", json={"name": "other", "address": "127.0.0.1:1", "cores": 1, "memory_mb": 64})
        assert r.status_code == 403, "a host registers as itself only"
        assert beat(c).status_code == 200  # control
    assert plane.log_has("(host a1, serial")
    assert "p/victim" in plane.volumes()


def test_the_agent_api_answers_the_manager_only(plane: Plane) -> None:
    base = f"https://127.0.0.1:{plane.agent_port}"
    with plane.client(Credentials(plane.agent_home / "pki"), base, PeerRule("host", "a1")) as c:
        r = c.post("/v1/vm/exec", json={"id": "x/y", "script": "id"})
        assert r.status_code == 403 and "only the manager" in r.json()["message"]
    with pytest.raises(httpx.HTTPError), plane.client(None, base) as c:
        c.post("/v1/vm/exec", json={"id": "x/y", "script": "id"})
    log = (plane.tmp / "agent-a1.log").read_text()
    assert "only the manager may call an agent" in log and "no client certificate" in log
    # control: the manager reaches it (host info asks the agent for its network state)
    info = json.loads(plane.cli("host", "info", "a1", "--json").stdout)
    assert info["leftovers"]["host"] == "a1", info["leftovers"]


def test_a_join_token_works_once(plane: Plane, tmp_path: Path) -> None:
    token = tmp_path / "t"
    plane.cli("host", "join-token", "--ttl", "5m", "--output", str(token))
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    secret = token.read_text().split(".")[2]
    assert secret not in (plane.pki / "tokens.json").read_text(), "stored hashed"
    from virtua.pki.ca import make_csr, new_key

    body = {"token": token.read_text().strip(), "name": "b1", "address": "127.0.0.1:9",
            "csr": make_csr(new_key(), "b1").decode()}
    with plane.client(None) as c:
        first = c.post("/v1/join", json=body)
        assert first.status_code == 200 and "BEGIN CERTIFICATE" in first.json()["cert"]
        again = c.post("/v1/join", json={**body, "name": "b2", "csr": make_csr(new_key(), "b2").decode()})
    assert again.status_code == 401 and "unknown or already used" in again.json()["message"]
    assert plane.log_has("refused join of 'b2' from 127.0.0.1")
    # an agent given a spent token says so in one line and exits
    r = subprocess.run(
        [sys.executable, "-m", "virtua.cli", "--home", str(tmp_path / "b3"), "agent", "--name", "b3",
         "--listen", f"127.0.0.1:{free_port()}", "--manager", plane.api, "--no-network", "--join-token-file", str(token)],
        env=plane.env, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 11 and r.stderr.strip().startswith("virtua: error: join token"), r.stderr
    assert "Traceback" not in r.stderr


def test_a_host_added_by_hand_joins_only_with_a_token_for_it(plane: Plane, tmp_path: Path) -> None:
    """Break B2: a token for any new host took over the record of a host the admin added."""
    from virtua.pki.ca import make_csr, new_key

    plane.cli("host", "add", "h9", "--address", "127.0.0.1:9")
    any_host, for_h9 = tmp_path / "any", tmp_path / "h9"
    plane.cli("host", "join-token", "--output", str(any_host))
    plane.cli("host", "join-token", "h9", "--output", str(for_h9))

    def join(token: Path, name: str) -> httpx.Response:
        body = {"token": token.read_text().strip(), "name": name, "address": "127.0.0.1:9",
                "csr": make_csr(new_key(), name).decode()}
        with plane.client(None) as c:
            return c.post("/v1/join", json=body)

    r = join(any_host, "h9")
    assert r.status_code == 403 and "host join-token h9" in r.json()["message"], r.text
    r = join(for_h9, "h8")
    assert r.status_code == 403 and "is for host h9, not h8" in r.json()["message"], r.text
    assert join(for_h9, "h9").status_code == 200, "control: its own token"
    assert join(any_host, "h7").status_code == 200, "neither refusal spent a token"
    r = plane.cli("host", "join-token", "admin", check=False)
    assert r.returncode != 0 and "reserved" in r.stderr
    plane.cli("host", "rm", "h9")
    plane.cli("host", "rm", "h7", check=False)


def test_a_host_registers_only_at_its_certificates_address(plane: Plane) -> None:
    reg = {"name": "a1", "cores": 1, "memory_mb": 512, "address": "127.0.0.2:8781"}
    with plane.client(Credentials(plane.agent_home / "pki")) as c:
        r = c.post("/v1/hosts/register", json=reg)
        assert r.status_code == 403 and "certificate is for 127.0.0.1" in r.json()["message"], r.text
        ok = c.post("/v1/hosts/register", json={**reg, "address": f"127.0.0.1:{plane.agent_port}"})
        assert ok.status_code == 200, ok.text
    hosts = {h["name"]: h for h in json.loads(plane.cli("host", "list", "--json").stdout)}
    assert hosts["a1"]["address"] == f"127.0.0.1:{plane.agent_port}"


def test_two_authorization_headers_are_refused(plane: Plane) -> None:
    """M2: only the first header counted; a proxy reading the last would disagree."""
    token = plane.pki.joinpath("admin-token").read_text().strip()
    ctx = ssl.create_default_context(cafile=str(plane.pki / "ca-cert.pem"))
    with httpx.Client(base_url=plane.api, verify=ctx, timeout=20) as c:
        two = [("authorization", f"Bearer {token}"), ("authorization", "Bearer junk")]
        r = c.get("/v1/volumes", headers=two)
        assert r.status_code == 401 and "2 Authorization headers" in r.json()["message"], r.text
        one = c.get("/v1/volumes", headers=[two[0]])
        assert one.status_code == 200, "control: one header"


def test_join_believes_no_forwarded_for_header(plane: Plane, tmp_path: Path) -> None:
    """F1: uvicorn took X-Forwarded-For from loopback as the peer: a local joiner got a
    certificate for any address."""
    from virtua.pki.ca import make_csr, new_key

    token = tmp_path / "t"
    plane.cli("host", "join-token", "--output", str(token))
    body = {"token": token.read_text().strip(), "name": "x5", "address": "10.0.0.5:8781",
            "csr": make_csr(new_key(), "x5").decode()}
    with plane.client(None) as c:
        for header in ({"x-forwarded-for": "10.0.0.5"}, {"x-real-ip": "10.0.0.5"}, {"forwarded": "for=10.0.0.5"}):
            r = c.post("/v1/join", json=body, headers=header)
            assert r.status_code == 403 and "joins from 127.0.0.1" in r.json()["message"], r.text


def test_a_host_says_only_true_things_about_itself(plane: Plane) -> None:
    """F3/F6: a host's networks go into every host's guest filter and its strings to the
    admin's terminal: networks must be real, narrow, and the host's own; accel is a word."""
    reg = {"name": "a1", "cores": 1, "memory_mb": 512, "address": f"127.0.0.1:{plane.agent_port}"}
    with plane.client(Credentials(plane.agent_home / "pki")) as c:
        for networks, status, text in ((["0.0.0.0/0"], 400, "wider than /16"), (["10.0.0.0/8"], 400, "wider than /16"),
                                       (["10.200.7.0/24"], 400, "overlaps the VC subnets"),
                                       (["bogus"], 400, "bad network"), (["10.99.0.0/24"], 403, "is not on"),
                                       (["127.0.0.0/16"], 200, "")):
            r = c.post("/v1/hosts/register", json={**reg, "networks": networks})
            assert r.status_code == status and text in r.text, (networks, r.text)
        r = c.post("/v1/hosts/register", json={**reg, "accel": "kvm\x1b[2J"})
        assert r.status_code == 400, r.text
        r = c.post("/v1/hosts/a1/heartbeat", json={"vms": [{"id": "x/y", "state": "evil\x07"}]})
        assert r.status_code == 400, r.text
        r = c.post("/v1/hosts/a1/heartbeat", json={"vms": [{"id": "x/y\nvirtua.manager: host good is offline",
                                                            "state": "running"}]})
        assert r.status_code == 400, "a VM id is VC/NODE: no forged log lines"
        for spelling in ("127.0.0.1\n:9", "::ffff:127.0.0.1:9", "[::ffff:127.0.0.1%eth0]:9", "127.0.0.1:09"):
            r = c.post("/v1/hosts/register", json={**reg, "address": spelling})
            assert r.status_code == 400, (spelling, r.text)  # one spelling: it becomes others' routes
        ok = c.post("/v1/hosts/register", json={**reg, "address": f"[::ffff:127.0.0.1]:{plane.agent_port}"})
        assert ok.status_code == 200, ok.text
        hosts = {h["name"]: h for h in json.loads(plane.cli("host", "list", "--json").stdout)}
        assert hosts["a1"]["address"] == f"127.0.0.1:{plane.agent_port}", "stored canonical"
        assert c.post("/v1/hosts/register", json=reg).status_code == 200, "control, and back to no networks"


def test_an_agent_refuses_a_revoked_admin_certificate(plane: Plane, tmp_path: Path) -> None:
    """F4: agents held no revocation list at all."""
    ca = ca_of(plane)
    cert, key = ca.issue("admin", "admin")
    spare = creds_from(tmp_path / "spare", ca.ca_pem, cert, key)
    base = f"https://127.0.0.1:{plane.agent_port}"
    with plane.client(spare, base, PeerRule("host", "a1")) as c:
        assert c.get("/v1/health").status_code == 200, "control: an admin certificate may call an agent"
    serial = x509_serial(cert)
    ca.revoke_serials([serial], "a spare admin certificate")

    def refused() -> bool:
        with plane.client(spare, base, PeerRule("host", "a1")) as c:
            return c.get("/v1/health").status_code == 403
    wait_for(refused, "the agent to learn of the revocation from its heartbeat", timeout=30)


def x509_serial(cert_pem: bytes) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert_pem).serial_number


def test_the_admin_token_over_tls(plane: Plane, tmp_path: Path) -> None:
    base = ["--api", plane.api, "--ca", str(plane.pki / "ca-cert.pem")]
    r = plane.cli(*base, "--token-file", str(plane.pki / "admin-token"), "volume", "list", "--json")
    assert "p/victim" in r.stdout, "control: the admin token works over TCP"
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    r = plane.cli(*base, "--token-file", str(wrong), "volume", "rm", "p/victim", check=False)
    assert r.returncode == 11 and "not the admin token" in r.stderr, r.stderr
    assert plane.log_has("the bearer token is not the admin token")
    assert "p/victim" in plane.volumes()
    assert plane.pki.joinpath("admin-token").read_text().strip() not in plane.log.read_text()


def test_bad_bodies_at_the_host_endpoints(plane: Plane) -> None:
    with plane.client(None) as c:
        r = c.post("/v1/join", content=b"{" + b" " * (80 << 10) + b"}")
        assert r.status_code == 400 and "over the limit" in r.json()["message"]
        r = c.post("/v1/join", content=b"[1, 2]")
        assert r.status_code == 400 and "JSON object" in r.json()["message"]
        r = c.post("/v1/join", json={"token": 5, "name": "x", "csr": "", "address": "1.2.3.4:5"})
        assert r.status_code == 400 and "bad join token" in r.json()["message"]
    with plane.client(Credentials(plane.agent_home / "pki")) as c:
        r = c.post("/v1/hosts/a1/heartbeat", content=b"not json")
        assert r.status_code == 400 and "not JSON" in r.json()["message"]
        r = c.post("/v1/hosts/a1/heartbeat", json={"vms": "all"})
        assert r.status_code == 400 and "argument 'vms' should be a list" in r.json()["message"]
    assert "Traceback" not in plane.log.read_text()


def test_revoking_a_certificate_ends_the_nbd_sessions_it_opened(plane: Plane, tmp_path: Path) -> None:
    """A revocation refused new handshakes, but an NBD session opened before it kept its
    export (reads and writes) for as long as the client liked. Now serve cuts it, also when
    another process wrote the revocation into the shared pki directory (as here)."""
    from virtua.nbd.client import NBDClient

    ca = ca_of(plane)
    cert, key = ca.issue("admin", "admin")
    spare = creds_from(tmp_path / "spare", ca.ca_pem, cert, key)

    def session(creds: Credentials) -> NBDClient:
        c = NBDClient.connect("127.0.0.1", plane.nbd_port, timeout=20)
        return c.open("p/victim", structured=False, tls=creds.client_context(MANAGER), tls_hostname="127.0.0.1")

    doomed, kept = session(spare), session(Credentials(plane.pki / "admin"))
    assert doomed.read(0, 4096) == kept.read(0, 4096), "control: both sessions read the export"
    ca.revoke_serials([x509_serial(cert)], "a spare admin certificate")

    def cut() -> bool:
        try:
            doomed.read(0, 4096)
        except (OSError, ConnectionError, ssl.SSLError):
            return True
        time.sleep(0.2)
        return False
    wait_for(cut, "serve to end the session of the revoked certificate", timeout=15)
    assert plane.log_has("is revoked", timeout=5)
    assert len(kept.read(0, 4096)) == 4096, "a session of a certificate still valid goes on"
    with pytest.raises((OSError, ConnectionError, ssl.SSLError)):
        session(spare).read(0, 4096)
    kept.disconnect()
    doomed.close()


def test_a_removed_host_is_revoked(plane: Plane) -> None:
    """Last in this module: it revokes a1."""
    host = Credentials(plane.agent_home / "pki")
    with plane.client(host) as c:
        assert beat(c).status_code == 200  # control
    out = json.loads(plane.cli("host", "rm", "a1", "--json").stdout)
    assert out["removed"] == ["a1"] and len(out["revoked"]) == 1
    assert plane.log_has("revoked", timeout=10)
    assert plane.log_has("certificate revoked", timeout=15), "the agent's next heartbeat is refused"
    time.sleep(2)
    hosts = json.loads(plane.cli("host", "list", "--json").stdout)
    assert hosts == [], "the revoked agent could not register again"
    with pytest.raises(httpx.HTTPError), plane.client(host) as c:
        c.get("/v1/templates/any/kernel")


@pytest.fixture
def serve_here(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Another serve on this machine, in the CLI's own home, with a volume named like the
    remote one's (p/victim, full of 0x55): over --api, the data must never go to it."""
    env = dict(os.environ, VIRTUA_HOME=str(tmp_path / "here"), COLUMNS="200")

    def cli(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "virtua.cli", *args], env=env, check=True, capture_output=True, timeout=60)

    cli("pool", "create", "p", "--capacity", "1G")
    cli("volume", "create", "p/victim", "--size", "8M")
    filler = tmp_path / "55.raw"
    filler.write_bytes(b"\x55" * (8 << 20))
    serve = subprocess.Popen(
        [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"127.0.0.1:{free_port()}",
         "--api-listen", f"127.0.0.1:{free_port()}"],
        env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "here.log", "w"), text=True,
    )
    try:
        assert serve.stdout is not None
        assert serve.stdout.readline().startswith("VIRTUA_READY"), (tmp_path / "here.log").read_text()
        nbd = str(tmp_path / "here" / "nbd.sock")
        subprocess.run(["nbdcopy", str(filler), f"nbd+unix:///p/victim?socket={nbd}"], check=True, timeout=60)
        yield env
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=20)


def test_data_moves_in_and_out_of_a_remote_serve_over_nbd_with_tls(
    plane: Plane, tmp_path: Path, serve_here: dict[str, str],
) -> None:
    """Over --api the data went through this machine's NBD socket, not the remote serve's:
    a serve here with a volume of the same name had it read (export) or its data written
    instead. Later it was refused. Now it goes to the remote serve's NBD port, over TLS with
    the admin certificate: every data command round-trips there, and the serve here with a
    same-named volume is neither read nor written."""
    base = [sys.executable, "-m", "virtua.cli", "--api", plane.api, "--cert", str(plane.pki / "admin")]

    def remote(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run([*base, *args], env=serve_here, input=stdin, capture_output=True, timeout=120)
        assert r.returncode == 0, (args, r.stderr.decode())
        return r

    def here(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "virtua.cli", *args], env=serve_here, capture_output=True,
                              text=True, check=True, timeout=60).stdout

    data = os.urandom(3 << 20) + b"\0" * (1 << 20) + os.urandom(1 << 20)
    src = tmp_path / "in.raw"
    src.write_bytes(data)
    qcow = tmp_path / "in.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(qcow)], check=True)

    # export of the same-named volume: the remote one's zeros, not this machine's 0x55
    out = tmp_path / "victim.raw"
    remote("volume", "export", "p/victim", str(out))
    assert out.read_bytes() == b"\0" * (8 << 20)
    assert remote("volume", "export", "p/victim", "-").stdout == b"\0" * (8 << 20)

    # imports, raw (a file of this machine: over NBD, not the serve's file copy), qcow2, stdin
    assert json.loads(remote("volume", "import", str(src), "p/fromapi", "--json").stdout)["via"] == "nbd"
    remote("volume", "import", str(qcow), "p/fromqcow")
    remote("volume", "import", "-", "p/fromstdin", "--size", str(len(data)), stdin=data)
    for name in ("p/fromapi", "p/fromqcow", "p/fromstdin"):  # read back on the serve's own machine
        assert name in plane.volumes(), name
        got = tmp_path / f"{name.replace('/', '_')}.raw"
        subprocess.run(["nbdcopy", f"nbd+unix:///{name}?socket={plane.home / 'nbd.sock'}", str(got)], check=True)
        assert got.read_bytes() == data, name
    qout = tmp_path / "out.qcow2"
    remote("volume", "export", "p/fromqcow", str(qout), "-O", "qcow2")
    assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qout), str(src)]).returncode == 0

    # incremental backup both ways, through the remote serve
    remote("snapshot", "create", "p/fromapi@s1")
    diff = tmp_path / "s1.diff"
    remote("volume", "export-diff", "p/fromapi@s1", str(diff))
    remote("volume", "import-diff", str(diff), "p/rebuilt")
    assert remote("volume", "export", "p/rebuilt", "-").stdout == data

    # nothing of it went to the serve on this machine
    assert [v["name"] for v in json.loads(here("volume", "list", "--json"))] == ["p/victim"]
    assert here("volume", "export", "p/victim", "-") == "\x55" * (8 << 20)


def test_data_over_the_api_without_a_certificate_is_refused_before_anything_starts(
    plane: Plane, tmp_path: Path,
) -> None:
    """The admin token opens the API, not NBD (TLS there takes a certificate): one line,
    before a job, a volume or a file exists."""
    base = ["--api", plane.api, "--token-file", str(plane.pki / "admin-token"), "--ca", str(plane.pki / "ca-cert.pem")]
    assert plane.cli(*base, "volume", "list", "--json").returncode == 0  # the token itself works
    src = tmp_path / "in.raw"
    src.write_bytes(b"\1" * 65536)
    out = tmp_path / "out.raw"
    jobs_before = plane.cli("job", "list", "--json").stdout
    for args in (["volume", "import", str(src), "p/fromtoken"], ["volume", "export", "p/victim", str(out)],
                 ["volume", "export-diff", "p/victim@s1", str(out)], ["volume", "import-diff", str(src), "p/victim"]):
        r = plane.cli(*base, *args, check=False)
        assert r.returncode == 2 and "needs --cert DIR" in r.stderr, (args, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.raw.*")), "no file, not even a partial one"
    assert "p/fromtoken" not in plane.volumes()
    assert plane.cli("job", "list", "--json").stdout == jobs_before, "no job began"
