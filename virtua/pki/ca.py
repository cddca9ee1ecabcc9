"""The cluster CA: created by `virtua serve` on first start (or supplied by the
administrator), it issues the manager's, the administrator's and every host's certificate,
and keeps the list of revoked serial numbers (also written as a CRL for the NBD server).

Layout of the pki directory (0700; every key 0600):
    ca-cert.pem ca-key.pem       the CA
    manager/                     the manager's server (and client) credentials
    admin/                       the administrator's client credentials
    issued.json revoked.json     serial -> (role, name, expiry); revoked serials
    crl.pem                      the revocation list in X.509 form
    tokens.json                  join tokens, hashed
    admin-token                  a bearer token for the admin over TCP (the cert's alternative)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from virtua.errors import InvalidArgument
from virtua.pki.credentials import Credentials
from virtua.pki.files import private_dir, write_private
from virtua.pki.identity import ADMIN_NAME, MANAGER_NAME, Role

log = logging.getLogger("virtua.pki")

CA_DAYS = 3650
CERT_DAYS = 365
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock differences between hosts


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the DER certificate, hex: what a join token pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _san(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


class ClusterCA:
    def __init__(self, pki_dir: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.dir = pki_dir
        self.cert = cert
        self.key = key
        self._lock = threading.Lock()
        self.on_revoke: list[Callable[[], None]] = []  # e.g. reload a TLS context's CRL
        self.revoked: set[int] = set()
        self._revoked_mtime = -1
        self._sync_revoked()
        self._told = len(self.revoked)  # how many revocations on_revoke has heard of

    # ------------------------------------------------------------------ creation

    @classmethod
    def ensure(
        cls, pki_dir: Path, *, manager_sans: list[str], supplied_cert: Path | None = None,
        supplied_key: Path | None = None,
    ) -> ClusterCA:
        """Load the CA in pki_dir, creating it (or installing the supplied one) on first
        start; (re)issue the manager's certificate when its names do not cover
        manager_sans, and the admin's when missing."""
        private_dir(pki_dir)
        cert_path, key_path = pki_dir / "ca-cert.pem", pki_dir / "ca-key.pem"
        if supplied_cert is not None and not cert_path.exists():
            if supplied_key is None:
                raise InvalidArgument("--ca-cert needs --ca-key (the CA signs host certificates)")
            write_private(key_path, supplied_key.read_bytes())
            write_private(cert_path, supplied_cert.read_bytes())
            log.info("installed the administrator's CA from %s", supplied_cert)
        if not cert_path.exists():
            key = new_key()
            name = x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "virtua"),
                x509.NameAttribute(NameOID.COMMON_NAME, "virtua cluster CA"),
            ])
            now = dt.datetime.now(dt.UTC)
            cert = (
                x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE).not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256())
            )
            write_private(key_path, key_pem(key))
            write_private(cert_path, cert_pem(cert))
            log.info("created the cluster CA in %s (sha256 %s)", pki_dir, fingerprint(cert))
        try:
            ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            ca_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, OSError) as e:
            raise InvalidArgument(f"cannot load the cluster CA in {pki_dir}: {e}") from e
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument(f"{key_path}: the CA key must be an EC key")
        ca = cls(pki_dir, ca_cert, ca_key)
        # MANAGER_NAME as a DNS name: what QEMU's tls-hostname checks (no host gets it)
        ca._ensure_identity(ca.manager, "manager", MANAGER_NAME, [*manager_sans, MANAGER_NAME])
        ca._ensure_identity(ca.admin, "admin", ADMIN_NAME, [])
        if not (pki_dir / "crl.pem").exists():
            ca.write_crl()
        if not ca.admin_token_path.exists():
            write_private(ca.admin_token_path, f"{secrets.token_hex(32)}\n".encode())
        return ca

    @property
    def admin_token_path(self) -> Path:
        return self.dir / "admin-token"

    def is_admin_token(self, presented: str) -> bool:
        """Constant-time comparison with the admin token on file (re-read: deleting the file
        and restarting serve rotates it)."""
        try:
            want = self.admin_token_path.read_text().strip()
        except FileNotFoundError:
            return False
        return bool(want) and hmac.compare_digest(
            hashlib.sha256(want.encode()).digest(), hashlib.sha256(presented.encode()).digest()
        )

    @property
    def manager(self) -> Credentials:
        return Credentials(self.dir / "manager")

    @property
    def admin(self) -> Credentials:
        return Credentials(self.dir / "admin")

    @property
    def crl_path(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def ca_pem(self) -> bytes:
        return cert_pem(self.cert)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def _ensure_identity(self, creds: Credentials, role: Role, name: str, sans: list[str]) -> None:
        if creds.complete():
            cert = x509.load_pem_x509_certificate(creds.cert.read_bytes())
            have: set[str] = set()
            try:
                ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                have = {str(v) for v in ext.get_values_for_type(x509.IPAddress)}
                have |= set(ext.get_values_for_type(x509.DNSName))
            except x509.ExtensionNotFound:
                pass
            fresh = cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
            ours = cert.issuer == self.cert.subject and creds.ca.read_bytes() == self.ca_pem
            if set(sans) <= have and fresh and ours and cert.serial_number not in self.revoked:
                return
        old = self.active_serials(role, name)
        key = new_key()
        cert_bytes = self._sign(key.public_key(), role, name, sans)
        write_private(creds.key, key_pem(key))
        write_private(creds.cert, cert_bytes)
        write_private(creds.ca, self.ca_pem)
        log.info("issued the %s certificate (%s) in %s", role, ", ".join(sans) or name, creds.dir)
        if old:  # a reissued identity leaves no older certificate valid (rotate = delete the dir, restart)
            self.revoke_serials(old, f"{role} {name}, reissued")

    # ------------------------------------------------------------------ issuing

    def _sign(self, public_key: Any, role: Role, name: str, sans: list[str], days: int = CERT_DAYS,
              not_after: dt.datetime | None = None) -> bytes:
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "virtua"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ])
        serial = x509.random_serial_number()
        b = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
            .public_key(public_key).serial_number(serial)
            .not_valid_before(min(now - _BACKDATE, not_after - dt.timedelta(days=1)) if not_after else now - _BACKDATE)
            .not_valid_after(not_after or now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(_san(sans)), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        self._record(serial, role, name, cert.not_valid_after_utc.timestamp(), sans)
        return cert_pem(cert)

    def issue(self, role: Role, name: str, sans: list[str] | None = None,
              not_after: dt.datetime | None = None) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a new identity (tests and tools)."""
        key = new_key()
        return self._sign(key.public_key(), role, name, sans or [], not_after=not_after), key_pem(key)

    @staticmethod
    def check_csr(csr_pem: bytes, name: str) -> x509.CertificateSigningRequest:
        """A well-formed, self-signed request whose CN is name (touches nothing). Only its
        key is used: the CA chooses the subject and the names itself."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise InvalidArgument(f"bad certificate request: {e}") from e
        if not csr.is_signature_valid:
            raise InvalidArgument("bad certificate request: its signature does not verify")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not cns or cns[0].value != name:
            raise InvalidArgument(f"bad certificate request: its CN must be the host name {name!r}")
        return csr

    def sign_csr(self, csr: x509.CertificateSigningRequest, role: Role, name: str, sans: list[str]) -> bytes:
        """Sign a request that check_csr() passed; sans must be IP addresses for a host."""
        return self._sign(csr.public_key(), role, name, sans)

    def holders_of_address(self, ip: str) -> list[str]:
        """Names of the hosts whose live certificates carry this IP address."""
        now = dt.datetime.now(dt.UTC).timestamp()
        return sorted({
            rec["name"] for s, rec in self.issued().items()
            if rec["role"] == "host" and rec["not_after"] > now and int(s) not in self.revoked
            and ip in rec.get("sans", ())
        })

    # ------------------------------------------------------------------ registry, revocation

    def _read(self, name: str, default: str) -> str:
        try:
            return (self.dir / name).read_text()
        except FileNotFoundError:
            return default

    def issued(self) -> dict[str, dict[str, Any]]:
        return json.loads(self._read("issued.json", "{}"))

    def _record(self, serial: int, role: str, name: str, not_after: float, sans: list[str]) -> None:
        with self._lock:
            issued = self.issued()
            issued[str(serial)] = {"role": role, "name": name, "not_after": not_after, "sans": sans}
            write_private(self.dir / "issued.json", json.dumps(issued, indent=1).encode())

    def active_serials(self, role: Role, name: str) -> list[int]:
        now = dt.datetime.now(dt.UTC).timestamp()
        return [
            int(s) for s, rec in self.issued().items()
            if rec["role"] == role and rec["name"] == name and rec["not_after"] > now
            and not self.is_revoked(int(s))
        ]

    def revoke_name(self, role: Role, name: str) -> list[int]:
        """Revoke every certificate issued to (role, name); returns their serials."""
        serials = self.active_serials(role, name)
        self.revoke_serials(serials, f"{role} {name}")
        return serials

    def _sync_revoked(self, strict: bool = True) -> None:
        """Take in revocations another process wrote (`virtua lab up` and serve share the
        pki directory); the set is only ever added to, in place. A file that does not parse
        (caught half written, or malformed) raises if strict, else leaves the set as it was;
        either way it is read again next time."""
        try:
            mtime = (self.dir / "revoked.json").stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime != self._revoked_mtime:
            try:
                listed = json.loads(self._read("revoked.json", "[]"))
                if not isinstance(listed, list) or not all(type(x) is int for x in listed):
                    raise ValueError(f"{self.dir / 'revoked.json'} is not a list of serial numbers")
            except (OSError, ValueError):
                if strict:
                    raise
                return
            # only once it parsed: a file caught half written is read again, even when the
            # whole one has the same mtime (a coarse file system clock)
            self._revoked_mtime = mtime
            self.revoked.update(listed)

    def is_revoked(self, serial: int) -> bool:
        self._sync_revoked(strict=False)  # per request: the watch (poll_revoked) reports a bad file
        return serial in self.revoked

    def revoke_serials(self, serials: list[int], whose: str) -> None:
        if not serials:
            return
        with self._lock:
            self._sync_revoked(strict=False)  # a malformed file is rewritten whole below
            self.revoked.update(serials)
            write_private(self.dir / "revoked.json", json.dumps(sorted(self.revoked)).encode())
        self.write_crl()
        self._tell()
        log.info("revoked the certificate(s) of %s: %s", whose, ", ".join(f"{s:x}" for s in serials))

    def poll_revoked(self) -> bool:
        """Take in revocations another process wrote (into the shared pki directory, its
        CRL written too) and tell on_revoke; whether there were any."""
        with self._lock:
            self._sync_revoked()
            if len(self.revoked) == self._told:
                return False
        self._tell()
        return True

    def _tell(self) -> None:
        self._told = len(self.revoked)
        for listener in self.on_revoke:
            listener()

    def write_crl(self) -> None:
        now = dt.datetime.now(dt.UTC)
        b = (
            x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
            .last_update(now - _BACKDATE).next_update(now + dt.timedelta(days=CA_DAYS))
        )
        for serial in sorted(self.revoked):
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        crl = b.sign(self.key, hashes.SHA256())
        write_private(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
