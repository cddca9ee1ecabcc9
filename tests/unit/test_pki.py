"""The cluster CA, join tokens, identities and the API's authorization table (pure, fast)."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from virtua.api.auth import Caller, authorize
from virtua.errors import AlreadyExists, Forbidden, InvalidArgument, Unauthenticated
from virtua.pki.ca import ClusterCA, fingerprint, make_csr, new_key
from virtua.pki.identity import Identity, identity_from_peercert
from virtua.pki.tokens import JoinTokens, parse_token
from virtua.vmm.qemu import DiskSpec, VMSpec, build_cmdline


@pytest.fixture
def ca(tmp_path: Path) -> ClusterCA:
    return ClusterCA.ensure(tmp_path / "pki", manager_sans=["10.1.2.3", "127.0.0.1", "localhost"])


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_first_start_creates_root_only_files(ca: ClusterCA) -> None:
    assert mode(ca.dir) == 0o700
    files = [p for p in ca.dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"ca-cert.pem", "ca-key.pem", "client-cert.pem", "client-key.pem", "crl.pem"}
    assert all(mode(p) == 0o600 for p in files), {str(p): oct(mode(p)) for p in files}
    assert all(mode(d) == 0o700 for d in (ca.dir / "manager", ca.dir / "admin"))
    cert = x509.load_pem_x509_certificate(ca.manager.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(i) for i in sans.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "virtua-manager"], "the name QEMU checks"


def test_second_start_keeps_the_ca_and_reissues_only_for_new_names(ca: ClusterCA) -> None:
    admin_before = ca.admin.cert.read_bytes()
    manager_before = ca.manager.cert.read_bytes()
    again = ClusterCA.ensure(ca.dir, manager_sans=["10.1.2.3", "127.0.0.1", "localhost"])
    assert again.fingerprint == ca.fingerprint
    assert again.manager.cert.read_bytes() == manager_before
    moved = ClusterCA.ensure(ca.dir, manager_sans=["10.9.9.9", "127.0.0.1", "localhost"])
    assert moved.fingerprint == ca.fingerprint
    assert moved.manager.cert.read_bytes() != manager_before, "a new advertise address needs a new cert"
    assert moved.admin.cert.read_bytes() == admin_before


def test_an_administrator_supplied_ca_is_used(ca: ClusterCA, tmp_path: Path) -> None:
    other = ClusterCA.ensure(tmp_path / "other", manager_sans=["127.0.0.1"],
                             supplied_cert=ca.dir / "ca-cert.pem", supplied_key=ca.dir / "ca-key.pem")
    assert other.fingerprint == ca.fingerprint
    with pytest.raises(InvalidArgument, match="--ca-key"):
        ClusterCA.ensure(tmp_path / "third", manager_sans=[], supplied_cert=ca.dir / "ca-cert.pem")


def test_csr_signing_checks_the_name(ca: ClusterCA) -> None:
    key = new_key()
    csr = ca.check_csr(make_csr(key, "h1"), "h1")
    cert = x509.load_pem_x509_certificate(ca.sign_csr(csr, "host", "h1", ["10.0.0.11"]))
    assert cert.issuer == ca.cert.subject
    assert ca.active_serials("host", "h1") == [cert.serial_number]
    assert ca.holders_of_address("10.0.0.11") == ["h1"]
    with pytest.raises(InvalidArgument, match="CN must be the host name"):
        ca.check_csr(make_csr(key, "h2"), "h1")
    with pytest.raises(InvalidArgument, match="bad certificate request"):
        ca.check_csr(b"not a csr", "h1")


def test_revocation_lists_the_serial_and_tells_listeners(ca: ClusterCA) -> None:
    ca.issue("host", "h1")
    (serial,) = ca.active_serials("host", "h1")
    told: list[int] = []
    ca.on_revoke.append(lambda: told.append(1))
    assert ca.revoke_name("host", "h1") == [serial]
    assert serial in ca.revoked and told == [1]
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert ca.active_serials("host", "h1") == []
    assert serial in ClusterCA.ensure(ca.dir, manager_sans=[]).revoked, "revocations survive a restart"


def test_join_tokens_work_once_and_are_stored_hashed(ca: ClusterCA) -> None:
    tokens = JoinTokens(ca.dir / "tokens.json", ca.fingerprint)
    token, _ = tokens.create(60)
    assert token.ca_fingerprint == ca.fingerprint == fingerprint(ca.cert)
    stored = (ca.dir / "tokens.json").read_text()
    assert token.secret not in stored and mode(ca.dir / "tokens.json") == 0o600
    wrong = f"vjt1.{token.id}.{'0' * 64}.{token.ca_fingerprint}"
    with pytest.raises(Unauthenticated, match="wrong secret"):
        tokens.consume(wrong, "h1", existing=False)
    assert tokens.consume(str(token), "h1", existing=False) == token.id, "a wrong guess does not burn the token"
    with pytest.raises(Unauthenticated, match="unknown or already used"):
        tokens.consume(str(token), "h1", existing=False)


def test_a_token_made_for_a_host_joins_that_host_only(ca: ClusterCA) -> None:
    tokens = JoinTokens(ca.dir / "tokens.json", ca.fingerprint)
    bound, _ = tokens.create(60, "h9")
    with pytest.raises(Forbidden, match="is for host h9, not h1"):
        tokens.consume(str(bound), "h1", existing=False)
    free, _ = tokens.create(60)
    with pytest.raises(Forbidden, match="host join-token h2"):
        tokens.consume(str(free), "h2", existing=True)
    # neither refusal spent its token
    assert tokens.consume(str(bound), "h9", existing=True) == bound.id
    assert tokens.consume(str(free), "h3", existing=False) == free.id


def test_expired_and_malformed_tokens(ca: ClusterCA) -> None:
    tokens = JoinTokens(ca.dir / "tokens.json", ca.fingerprint)
    token, _ = tokens.create(60)
    data = json.loads((ca.dir / "tokens.json").read_text())
    data[token.id]["expires"] = 1.0
    (ca.dir / "tokens.json").write_text(json.dumps(data))
    with pytest.raises(Unauthenticated, match="expired"):
        tokens.consume(str(token), "h1", existing=False)
    with pytest.raises(InvalidArgument, match="bad join token"):
        parse_token("vjt1.short")
    with pytest.raises(InvalidArgument, match="bad --ttl"):
        tokens.create(0)


def test_identity_from_a_peer_certificate() -> None:
    cert = {"subject": ((("organizationName", "virtua"),), (("organizationalUnitName", "host"),),
                        (("commonName", "h1"),)), "serialNumber": "0A"}
    assert identity_from_peercert(cert) == Identity("host", "h1", 10)
    foreign = {"subject": ((("commonName", "h1"),),), "serialNumber": "0A"}
    assert identity_from_peercert(foreign) is None, "no role, no identity"
    assert identity_from_peercert(None) is None


LOCAL = Caller(peer="unix", local=True)
ADMIN = Caller(peer="10.0.0.5:1", identity=Identity("admin", "admin", 1))
H1 = Caller(peer="10.0.0.11:1", identity=Identity("host", "h1", 2))
H2 = Caller(peer="10.0.0.12:1", identity=Identity("host", "h2", 3))
MANAGER = Caller(peer="10.0.0.1:1", identity=Identity("manager", "virtua-manager", 4))
NOBODY = Caller(peer="10.0.0.66:1")
TOKEN = Caller(peer="10.0.0.5:2", admin_token=True)
OWNERS = {("template", "mini"): {"h1"}, ("vmstate", "web/web-1"): {"h1"}}

# (method, path, caller, expected: None = allowed, else the error raised)
AUTH_TABLE = [
    ("DELETE", "/v1/pools/p/volumes/v", LOCAL, None),
    ("DELETE", "/v1/pools/p/volumes/v", ADMIN, None),
    ("DELETE", "/v1/pools/p/volumes/v", H1, Forbidden),
    ("DELETE", "/v1/pools/p/volumes/v", MANAGER, Forbidden),
    ("DELETE", "/v1/pools/p/volumes/v", NOBODY, Unauthenticated),
    ("DELETE", "/v1/pools/p/volumes/v", TOKEN, None),
    # a host called "register" or "h1": the operations on it are an administrator's
    ("GET", "/v1/hosts/register", H1, Forbidden),
    ("DELETE", "/v1/hosts/register", H1, Forbidden),
    ("POST", "/v1/hosts/h1/drain", H1, Forbidden),
    ("GET", "/v1/hosts/h1/heartbeat", H1, Forbidden),
    ("GET", "/v1/vmstate/web/web-1", TOKEN, None),
    ("GET", "/v1/status", H1, Forbidden),
    ("GET", "/v1/anything-new", H1, Forbidden),
    ("GET", "/docs", NOBODY, Unauthenticated),
    ("POST", "/v1/join", NOBODY, None),
    ("GET", "/v1/join/ca", NOBODY, None),
    ("POST", "/v1/hosts/register", H1, None),
    ("POST", "/v1/hosts/register", NOBODY, Unauthenticated),
    ("POST", "/v1/hosts/h1/heartbeat", H1, None),
    ("POST", "/v1/hosts/h1/heartbeat", H2, Forbidden),
    ("POST", "/v1/hosts/h1/heartbeat", MANAGER, Forbidden),
    ("POST", "/v1/hosts/h1/heartbeat", NOBODY, Unauthenticated),
    ("GET", "/v1/templates/mini/kernel", H1, None),
    ("GET", "/v1/templates/mini/kernel", H2, Forbidden),
    ("GET", "/v1/templates/mini/kernel", ADMIN, None),
    ("GET", "/v1/templates/other/kernel", H1, Forbidden),
    ("PUT", "/v1/vmstate/web/web-1", H1, None),
    ("GET", "/v1/vmstate/web/web-1", H2, Forbidden),
    ("GET", "/v1/vmstate/web/web-1", NOBODY, Unauthenticated),
    ("DELETE", "/v1/vmstate/web/web-1", H1, Forbidden),
]


@pytest.mark.parametrize(("method", "path", "caller", "expected"), AUTH_TABLE,
                         ids=[f"{m} {p} {c}" for m, p, c, _ in AUTH_TABLE])
def test_authorization_table(method: str, path: str, caller: Caller, expected: type[Exception] | None) -> None:
    def owners_of(kind: str, key: str) -> set[str]:
        return OWNERS.get((kind, key), set())

    if expected is None:
        authorize(method, path, caller, owners_of)
    else:
        with pytest.raises(expected):
            authorize(method, path, caller, owners_of)


def test_every_operations_route_is_an_administrators() -> None:
    """No operation's route falls into a host's or anyone's endpoint class, whatever its
    names are (a host, a template or a VC called like a path word)."""
    from virtua.api.routes import ROUTES

    def owners_of(kind: str, key: str) -> set[str]:
        return {"h1"}  # h1 owns everything: only the endpoint class may refuse it

    words = ["register", "heartbeat", "h1", "kernel", "initrd", "ca", "join", "web-1"]
    checked = 0
    for route in ROUTES.values():
        for word in words:
            path = route.path.format(**dict.fromkeys(route.path_params, word))
            for caller in (H1, MANAGER):
                with pytest.raises(Forbidden):
                    authorize(route.method, path, caller, owners_of)
            with pytest.raises(Unauthenticated):
                authorize(route.method, path, NOBODY, owners_of)
            authorize(route.method, path, TOKEN, owners_of)
            checked += 1
    assert checked == len(ROUTES) * len(words) and len(ROUTES) > 40


def test_qemu_opens_nbds_disks_with_the_hosts_credentials_directory(tmp_path: Path) -> None:
    spec = VMSpec(
        name="n1", kernel=tmp_path / "k", serial_log=tmp_path / "s", console_socket=tmp_path / "c",
        qmp_socket=tmp_path / "q", pidfile=tmp_path / "p", tls_creds_dir=tmp_path / "pki",
        disks=[DiskSpec(source="nbds://10.0.0.1:10809/default/vc-n1"), DiskSpec(source="nbd://127.0.0.1/x")],
    )
    argv = build_cmdline(spec)
    objects = [argv[i + 1] for i, a in enumerate(argv) if a == "-object"]
    assert objects == [f"tls-creds-x509,id=virtua-tls,dir={tmp_path / 'pki'},endpoint=client,verify-peer=on"]
    blockdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-blockdev"]
    assert "tls-creds=virtua-tls" in blockdevs[0] and "tls-creds" not in blockdevs[1]
    assert not any("key" in a and a.endswith(".pem") for a in argv), "the key file is never named"
    with pytest.raises(InvalidArgument, match="tls_creds_dir"):
        build_cmdline(spec.model_copy(update={"tls_creds_dir": None}))


def test_expired_certificate_dates(ca: ClusterCA) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    cert_pem, _ = ca.issue("host", "old", not_after=past)
    assert x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc < dt.datetime.now(dt.UTC)
    assert ca.active_serials("host", "old") == [], "an expired certificate is not active"


def test_join_refuses_reserved_and_taken_names(tmp_path: Path, ca: ClusterCA) -> None:
    from virtua.cluster.manager import Manager
    from virtua.cluster.store import SQLiteStore
    from virtua.storage.service import Storage

    m = Manager(tmp_path, Storage(tmp_path / "home"), SQLiteStore(tmp_path / "m.db"), authority=ca)
    csr = make_csr(new_key(), "h1").decode()
    with pytest.raises(InvalidArgument, match="reserved"):
        m.join(m.join_token("1h")["token"], "admin", csr, "10.0.0.11:8781", peer="10.0.0.11")
    r = m.join(m.join_token("1h")["token"], "h1", csr, "10.0.0.11:8781", peer="10.0.0.11")
    cert = x509.load_pem_x509_certificate(r["cert"].encode())
    assert cert.subject.rfc4514_string() == "CN=h1,OU=host,O=virtua"
    with pytest.raises(AlreadyExists, match="host rm h1"):
        m.join(m.join_token("1h")["token"], "h1", csr, "10.0.0.11:8781", peer="10.0.0.11")


def test_join_binds_the_certificate_to_the_joining_address(tmp_path: Path, ca: ClusterCA) -> None:
    """Break B1 of the adversarial pass: the certificate's IP was whatever the body said,
    so a host could get one for the manager's address (or another host's)."""
    from virtua.cluster.manager import Manager
    from virtua.cluster.store import SQLiteStore
    from virtua.storage.service import Storage

    m = Manager(tmp_path, Storage(tmp_path / "home"), SQLiteStore(tmp_path / "m.db"), authority=ca,
                advertise="10.0.0.1")
    token = m.join_token("1h")["token"]

    def join(name: str, address: str, peer: str) -> dict[str, str]:
        return m.join(token, name, make_csr(new_key(), name).decode(), address, peer=peer)

    with pytest.raises(Forbidden, match="joins from 10.0.0.66 but says it listens on 10.0.0.1"):
        join("h1", "10.0.0.1:8781", "10.0.0.66")  # the manager's address
    with pytest.raises(InvalidArgument, match="expected IP:PORT"):
        join("h1", "virtua-manager:8781", "10.0.0.66")  # would have been a DNS name in the certificate
    with pytest.raises(InvalidArgument, match="one address"):
        join("h1", "0.0.0.0:8781", "10.0.0.66")
    with pytest.raises(InvalidArgument, match="bad certificate request"):
        m.join(token, "h1", "garbage", "10.0.0.66:8781", peer="10.0.0.66")  # M1: checked first
    r = join("h1", "10.0.0.66:8781", "10.0.0.66")  # the same token: no refusal above spent it
    cert = x509.load_pem_x509_certificate(r["cert"].encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v.value) for v in san] == ["10.0.0.66"], "one IP, no DNS name"
    with pytest.raises(AlreadyExists, match="belongs to host h1"):
        m.join(m.join_token("1h")["token"], "h2", make_csr(new_key(), "h2").decode(), "10.0.0.66:8781",
               peer="10.0.0.66")
    with pytest.raises(AlreadyExists, match="belongs to host h1"):  # the same address, IPv4-mapped
        m.join(m.join_token("1h")["token"], "h3", make_csr(new_key(), "h3").decode(), "::ffff:10.0.0.66:8781",
               peer="::ffff:10.0.0.66")
    with pytest.raises(InvalidArgument, match="reserved"):
        m.join(m.join_token("1h")["token"], "Virtua-Manager", make_csr(new_key(), "Virtua-Manager").decode(),
               "10.0.0.67:8781", peer="10.0.0.67")
    # a joiner on the manager's own machine may listen on loopback (the local agent)
    m.join(m.join_token("1h")["token"], "local", make_csr(new_key(), "local").decode(), "127.0.0.1:8781",
           peer="10.0.0.1")


def test_a_host_added_by_the_admin_joins_only_with_its_own_token(tmp_path: Path, ca: ClusterCA) -> None:
    """Break B2: any token could take over a host record the administrator had added."""
    from virtua.cluster.manager import Manager
    from virtua.cluster.store import SQLiteStore
    from virtua.storage.service import Storage

    m = Manager(tmp_path, Storage(tmp_path / "home"), SQLiteStore(tmp_path / "m.db"), authority=ca)
    m.add_host("h9", "10.0.0.9:8781")
    csr = make_csr(new_key(), "h9").decode()
    with pytest.raises(Forbidden, match="host join-token h9"):
        m.join(m.join_token("1h")["token"], "h9", csr, "10.0.0.9:8781", peer="10.0.0.9")
    assert ca.active_serials("host", "h9") == []
    m.join(m.join_token("1h", name="h9")["token"], "h9", csr, "10.0.0.9:8781", peer="10.0.0.9")
    assert len(ca.active_serials("host", "h9")) == 1


def test_a_bearer_token_is_the_admin_token_or_refused(ca: ClusterCA) -> None:
    from virtua.api.auth import caller_of

    token = ca.admin_token_path.read_text().strip()
    assert len(token) == 64 and mode(ca.admin_token_path) == 0o600

    def scope(header: bytes | None) -> dict[str, object]:
        return {"client": ("10.0.0.5", 2), "state": {}, "headers": [(b"authorization", header)] if header else []}

    assert caller_of(scope(b"Bearer " + token.encode()), ca.is_admin_token).admin
    with pytest.raises(Unauthenticated, match="not the admin token"):
        caller_of(scope(b"Bearer " + b"0" * 64), ca.is_admin_token)
    with pytest.raises(Unauthenticated):
        caller_of(scope(b"Basic " + token.encode()), ca.is_admin_token)
    assert not caller_of(scope(None), ca.is_admin_token).admin


def test_a_reissued_identity_revokes_the_older_certificate(ca: ClusterCA) -> None:
    """F4: deleting pki/admin and restarting issued a new admin certificate and left the
    old one valid for a year."""
    old = x509.load_pem_x509_certificate(ca.admin.cert.read_bytes()).serial_number
    assert not ca.is_revoked(old)
    import shutil

    shutil.rmtree(ca.admin.dir)
    again = ClusterCA.ensure(ca.dir, manager_sans=["10.1.2.3", "127.0.0.1", "localhost"])
    new = x509.load_pem_x509_certificate(again.admin.cert.read_bytes()).serial_number
    assert new != old and again.is_revoked(old) and not again.is_revoked(new)
    assert ca.is_revoked(old), "another process's CA object sees it too (revoked.json)"
    crl = x509.load_pem_x509_crl(again.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(old) is not None


def test_an_agent_keeps_the_revocations_it_heard_of_across_restarts(tmp_path: Path) -> None:
    """Review 3: a restarted agent accepted revoked certificates until its first heartbeat
    (forever, with the manager unreachable)."""
    from virtua.cluster.agent import Agent, AgentConfig

    cfg = AgentConfig(name="h1", listen="127.0.0.1:1", manager="https://127.0.0.1:2", home=tmp_path)
    first = Agent(cfg)
    first._set_revoked({0xABC, 0x123})
    first._set_revoked({0x123})  # a shorter list never un-revokes
    assert first.revoked == {0xABC, 0x123}
    assert Agent(cfg).revoked == {0xABC, 0x123}
    assert mode(tmp_path / "pki-revoked.json") == 0o600
