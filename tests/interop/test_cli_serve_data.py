"""Data in and out while `virtua serve` holds the pools, with TLS required and an allow-list
that matches every volume: files and stdin/stdout, raw and qcow2, byte for byte."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cli_support import RemoteV, Serve, V

pytestmark = pytest.mark.interop


def test_import_export_under_required_tls(tmp_path: Path) -> None:
    v = V(tmp_path / "home")
    v.run("pool", "create", "p", "--capacity", "256M")
    keys = tmp_path / "keys.psk"
    keys.write_text(f"alice:{os.urandom(32).hex()}\n")
    serve = Serve(v.home, "--tls", "require", "--tls-psk", str(keys), "--allow", "p/*=alice")
    try:
        img = tmp_path / "disk.raw"
        with open(img, "wb") as f:
            f.truncate(16 << 20)
            f.seek(5 << 20)
            f.write(os.urandom(1 << 20))
        assert v.json("volume", "import", str(img), "p/disk")["allocated"] == 1 << 20
        out = tmp_path / "out.raw"
        v.run("volume", "export", "p/disk", str(out))
        assert out.read_bytes() == img.read_bytes()
        assert out.stat().st_blocks * 512 <= 2 << 20, "export stays sparse"
        # stdin and stdout
        v.run("volume", "import", "-", "p/piped", input=img.read_bytes())
        assert v.run("volume", "export", "p/piped", "-").stdout == img.read_bytes()
        # qcow2 both ways, snapshots too
        v.run("snapshot", "create", "p/disk@s1")
        q = tmp_path / "s1.qcow2"
        assert v.json("volume", "export", "p/disk@s1", str(q), "-O", "qcow2")["size"] == 16 << 20
        v.run("volume", "import", str(q), "p/fromq")
        assert v.run("volume", "export", "p/fromq", "-").stdout == img.read_bytes()
        # a client with an identity the key file does not have is logged as exactly that
        other = tmp_path / "other.psk"
        other.write_text(f"mallory:{os.urandom(32).hex()}\n")
        uri = f"nbds://mallory@127.0.0.1:{serve.port}/p/disk?tls-psk-file={other}"
        assert subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode != 0
    finally:
        err = serve.stop()
    assert "Traceback" not in err, err
    assert "TLS required with PSK" in err, "the start-up line says the TLS mode"
    assert "unknown PSK identity 'mallory'" in err, err


def test_data_goes_through_serve_in_a_home_whose_path_has_a_space(tmp_path: Path) -> None:
    """serve's NBD socket is inside its home: a space in that path made the URI handed to
    nbdcopy and qemu-img unparsable ("unable to parse URI"), so every import and export
    over NBD failed there. Now the path is percent-encoded (both tools decode it)."""
    v = V(tmp_path / "my home")
    v.run("pool", "create", "p", "--capacity", "64M")
    serve = Serve(v.home)
    try:
        data = os.urandom(1 << 20)
        v.run("volume", "import", "-", "p/piped", "--size", str(len(data)), input=data)  # nbdcopy over NBD
        assert v.run("volume", "export", "p/piped", "-").stdout == data
        q = tmp_path / "out.qcow2"
        v.run("volume", "export", "p/piped", str(q), "-O", "qcow2")
        back = tmp_path / "back.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(q), str(back)], check=True)
        assert back.read_bytes() == data
    finally:
        serve.stop()


def test_qcow2_over_the_api_with_a_certificate_directory_whose_name_has_a_comma(tmp_path: Path) -> None:
    """qemu-img takes the certificate directory in `--object tls-creds-x509,dir=DIR,...`: a
    comma in DIR ended the value there, so every qcow2 import and export over --api failed
    with such a --cert (nbdcopy's URI, raw, was fine). QEMU's escape is a doubled comma."""
    v = V(tmp_path / "home")
    v.run("pool", "create", "p", "--capacity", "64M")
    serve = Serve(v.home)
    try:
        certs = tmp_path / "admin,2026"
        shutil.copytree(v.home / "pki" / "admin", certs)
        remote = RemoteV(serve, tmp_path / "client")
        remote.prefix[-1] = str(certs)
        data = os.urandom(1 << 20)
        raw = tmp_path / "in.raw"
        raw.write_bytes(data)
        qcow = tmp_path / "in.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True)
        remote.run("volume", "import", str(qcow), "p/fromqcow")
        out = tmp_path / "out.qcow2"
        remote.run("volume", "export", "p/fromqcow", str(out), "-O", "qcow2")
        assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out), str(raw)]).returncode == 0
    finally:
        serve.stop()


def test_a_diff_over_the_api_that_nbd_refuses_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """export-diff and import-diff open the export with virtua's own NBD client: over --api
    a refusal there (here serve's --allow rule names only host h1) escaped as a Python
    traceback (OptionError), where nbdcopy's refusal of the same export is one line."""
    v = V(tmp_path / "home")
    v.run("pool", "create", "p", "--capacity", "64M")
    v.run("volume", "create", "p/vol", "--size", "4M")
    v.run("snapshot", "create", "p/vol@s1")
    serve = Serve(v.home, "--allow", "p/*=h1")
    try:
        remote = RemoteV(serve, tmp_path / "client")
        out = tmp_path / "s1.diff"
        line = remote.fails(12, "volume", "export-diff", "p/vol@s1", str(out), match="refused p/vol@s1: access to export 'p/vol@s1' denied")
        assert "Traceback" not in line and not out.exists()
        v.run("volume", "export-diff", "p/vol@s1", str(out))  # control: serve's own socket
        remote.fails(12, "volume", "import-diff", str(out), "p/copy", match="refused p/copy: access")
        assert "p/copy" not in {x["name"] for x in v.json("volume", "list")}, "the volume it made is removed"
    finally:
        serve.stop()
