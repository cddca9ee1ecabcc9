"""TLS with real GnuTLS clients: X.509 and PSK (qemu-img, qemu-io, nbdinfo, nbdcopy)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop


def x509_server(nbd_server, tls, *extra: str):
    return nbd_server("--tls", "require", "--tls-cert", str(tls.server_cert),
                      "--tls-key", str(tls.server_key), *extra)


def psk_server(nbd_server, tls, *extra: str):
    return nbd_server("--tls", "require", "--tls-psk", str(tls.psk), *extra)


def qemu_psk(tls) -> list[str]:
    return ["--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={tls.psk_client_dir},username=alice"]


def qemu_x509(d) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={d}"]


def nbd_opts(srv, export: str = "disk.img") -> str:
    return f"driver=nbd,host=127.0.0.1,port={srv.port},export={export},tls-creds=tls0"


def test_x509_qemu_and_nbdinfo(nbd_server, sh, tls_files):
    srv = x509_server(nbd_server, tls_files, "--tls-ca", str(tls_files.ca))
    out = sh(["qemu-io", *qemu_x509(tls_files.x509_client_dir), "--image-opts",
              "-c", "write -P 0x3c 1M 256k", "-c", "read -P 0x3c 1M 256k", nbd_opts(srv)]).stdout
    assert "Pattern verification failed" not in out and "read 262144/262144" in out
    uri = srv.uri(tls=True, query=f"tls-certificates={tls_files.x509_client_dir}")
    out = sh(["nbdinfo", uri]).stdout
    assert "with TLS" in out
    assert sh(["nbdinfo", "--is", "tls", uri], check=False).returncode == 0
    # a client without a certificate is refused when the server verifies clients
    p = sh(["nbdinfo", srv.uri(tls=True, query=f"tls-certificates={tls_files.x509_noclient_dir}")],
           check=False)
    assert p.returncode != 0


def test_x509_acl_by_certificate_cn(nbd_server, sh, tls_files, tmp_path, monkeypatch):
    # DirectoryProvider ACLs are not on the CLI: load a tiny provider module instead
    (tmp_path / "aclprov.py").write_text(
        "from virtua.nbd.exports import DirectoryProvider\n"
        "def make(d):\n"
        "    return DirectoryProvider(d, acl={'disk.img': {'client-alice'}, 'disk@ro': {'nobody'}})\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    srv = nbd_server("--provider", "aclprov:make", "--provider-arg", str(srv_dir(tmp_path)),
                     "--tls", "require", "--tls-cert", str(tls_files.server_cert),
                     "--tls-key", str(tls_files.server_key), "--tls-ca", str(tls_files.ca))
    q = f"tls-certificates={tls_files.x509_client_dir}"
    assert sh(["nbdinfo", srv.uri("disk.img", tls=True, query=q)], check=False).returncode == 0
    p = sh(["nbdinfo", srv.uri("disk@ro", tls=True, query=q)], check=False)
    assert p.returncode != 0 and "disk@ro" in p.stderr, p.stderr
    out = sh(["nbdinfo", "--list", f"nbds://127.0.0.1:{srv.port}/?{q}"]).stdout
    assert "disk.img" in out and "disk@ro" not in out


def srv_dir(tmp_path):
    d = tmp_path / "acl-exports"
    d.mkdir(exist_ok=True)
    for name in ("disk.img", "disk@ro"):
        with open(d / name, "wb") as f:
            f.truncate(1024 * 1024)
    return d


def test_psk_qemu_img_nbdinfo_nbdcopy(nbd_server, sh, tls_files, tmp_path):
    srv = psk_server(nbd_server, tls_files)
    out = sh(["qemu-io", *qemu_psk(tls_files), "--image-opts",
              "-c", "write -P 0x5e 0 64k", "-c", "read -P 0x5e 0 64k", nbd_opts(srv)]).stdout
    assert "Pattern verification failed" not in out and "read 65536/65536" in out
    out = sh(["qemu-img", "info", *qemu_psk(tls_files), "--image-opts", nbd_opts(srv)]).stdout
    assert "64 MiB" in out
    uri = srv.uri(tls=True, user="alice", query=f"tls-psk-file={tls_files.psk}")
    assert "with TLS" in sh(["nbdinfo", uri]).stdout
    dst = tmp_path / "copy.img"
    sh(["nbdcopy", "--connections=2", uri, str(dst)])
    assert dst.read_bytes()[:65536] == b"\x5e" * 65536


def test_psk_wrong_key_and_unknown_user_refused(nbd_server, sh, tls_files):
    srv = psk_server(nbd_server, tls_files)
    p = sh(["nbdinfo", srv.uri(tls=True, user="alice", query=f"tls-psk-file={tls_files.bad_psk}")],
           check=False)
    assert p.returncode != 0
    p = sh(["nbdinfo", srv.uri(tls=True, user="mallory", query=f"tls-psk-file={tls_files.psk}")],
           check=False)
    assert p.returncode != 0
    # the server is still fine afterwards
    ok = srv.uri(tls=True, user="alice", query=f"tls-psk-file={tls_files.psk}")
    assert sh(["nbdinfo", "--can", "write", ok], check=False).returncode == 0


def test_plaintext_refused_when_tls_required(nbd_server, sh, tls_files):
    srv = psk_server(nbd_server, tls_files)
    p = sh(["nbdinfo", srv.uri()], check=False)
    assert p.returncode != 0
    p = sh(["qemu-io", "-f", "raw", "-c", "read 0 512", srv.uri()], check=False)
    assert p.returncode != 0 and "read 512/512" not in p.stdout
    p = sh(["nbdinfo", "--list", f"nbd://127.0.0.1:{srv.port}"], check=False)
    assert p.returncode != 0


def test_tls_on_is_optional(nbd_server, sh, tls_files):
    srv = nbd_server("--tls", "on", "--tls-psk", str(tls_files.psk))
    assert "without TLS" in sh(["nbdinfo", srv.uri()]).stdout
    uri = srv.uri(tls=True, user="alice", query=f"tls-psk-file={tls_files.psk}")
    assert "with TLS" in sh(["nbdinfo", uri]).stdout
