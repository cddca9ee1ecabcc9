"""Import refuses damaged or truncated images (real qcow2 files cut short) and leaves nothing
behind; export never overwrites by surprise and never leaves a partial file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.cli_support import V


@pytest.fixture
def v(tmp_path: Path) -> V:
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "256M", "--chunk-size", "64K", "--overcommit", "40")
    return cli


def qcow2_with_two_regions(path: Path) -> None:
    """64K clusters: header, refcounts, L1, an L2 + 1 MiB of data at 0, another L2 + 1 MiB at 3G."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4G"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 3G 1M", str(path)],
                   check=True, capture_output=True)


def cut(src: Path, dst: Path, length: int) -> Path:
    with open(src, "rb") as f:
        dst.write_bytes(f.read(length))
    return dst


def test_damaged_qcow2_is_refused_and_leaves_nothing(v: V, tmp_path: Path) -> None:
    good = tmp_path / "good.qcow2"
    qcow2_with_two_regions(good)
    extents = subprocess.run(["qemu-img", "map", "--output=json", str(good)], capture_output=True, text=True,
                             check=True).stdout
    assert '"offset": 1441792' in extents, extents  # the second region's data: its L2 sits just before it
    second_l2, second_data = 1441792 - 65536, 1441792
    cases = {
        "header only": (cut(good, tmp_path / "head.qcow2", 100), "header too short"),
        "cut inside an L2 table": (cut(good, tmp_path / "l2.qcow2", second_l2 + 1000), "truncated"),
        "cut inside the data": (cut(good, tmp_path / "data.qcow2", second_data + 300 * 1024), "truncated"),
    }
    for what, (path, reason) in cases.items():
        line = v.fails(2, "volume", "import", str(path), f"p/{path.stem}", match="damaged qcow2 image")
        assert reason in line and str(path) in line, (what, line)
    assert v.json("volume", "list") == [], "a refused import leaves no volume behind"
    info = v.json("volume", "import", str(good), "p/good")
    assert info["format"] == "qcow2" and info["size"] == 4 << 30 and info["allocated"] == 2 << 20


def test_export_refuses_to_overwrite_and_leaves_no_partial_file(v: V, tmp_path: Path) -> None:
    v.run("volume", "create", "p/d", "--size", "4M")
    out = tmp_path / "out.raw"
    out.write_bytes(b"precious")
    v.fails(4, "volume", "export", "p/d", str(out), match="--force")
    assert out.read_bytes() == b"precious"
    v.run("volume", "export", "p/d", str(out), "--force")
    assert out.stat().st_size == 4 << 20 and out.stat().st_mode & 0o777 == 0o644
    # a full filesystem: the export fails with exit 6 and leaves neither file nor temporary
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        img = tmp_path / "rand"
        img.write_bytes(os.urandom(3 << 20))
        v.run("volume", "import", str(img), "p/rand")
        v.fails(6, "volume", "export", "p/rand", str(full / "x.raw"), match="no space left")
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_an_image_qemu_img_cannot_inspect_in_time_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-img info/check of a crafted image must not hold an import forever: past the
    probe's time limit (here one no qemu-img start can meet) it is refused, saying why."""
    from virtua.errors import InvalidArgument
    from virtua.storage import imageio

    img = tmp_path / "slow.qcow2"
    qcow2_with_two_regions(img)
    assert imageio.probe(str(img)).format == "qcow2"  # control: in time, it passes
    monkeypatch.setattr(imageio, "PROBE_TIMEOUT", 0.001)
    with pytest.raises(InvalidArgument, match=r"slow.qcow2: `qemu-img info` did not finish within 0.001 s: refused"):
        imageio.probe(str(img))


def test_a_remote_serve_is_reached_on_its_nbd_address_never_this_machines_loopback() -> None:
    """Over --api the data goes to serve's NBD listener: the API's address when NBD listens
    on every address or on loopback of the same machine, its own address when it is one;
    NBD on loopback only, reached from elsewhere, would be this machine's loopback (maybe
    another serve's): refused."""
    from virtua.cli.data import _nbd_host
    from virtua.errors import InvalidArgument

    assert _nbd_host("0.0.0.0", "10.0.0.5", "import") == "10.0.0.5"
    assert _nbd_host("::", "10.0.0.5", "import") == "10.0.0.5"
    assert _nbd_host("10.0.0.6", "10.0.0.5", "import") == "10.0.0.6"
    assert _nbd_host("127.0.0.1", "127.0.0.1", "import") == "127.0.0.1"
    assert _nbd_host("127.0.0.1", "localhost", "export") == "localhost"
    with pytest.raises(InvalidArgument, match="takes NBD on 127.0.0.1 only"):
        _nbd_host("127.0.0.1", "10.0.0.5", "import")


def test_a_wildcard_or_loopback_nbd_listener_is_known_however_its_address_is_spelled() -> None:
    """serve binds what getaddrinfo makes of --listen: `[::0]`, `0` and `0:0::0` are every
    address, `127.1` loopback. Compared as text, they were taken for an address of serve's
    own, so the data went to that address on this machine: its own wildcard or loopback,
    maybe another serve's (or NBD on loopback only, reached from elsewhere, was not refused)."""
    from virtua.cli.data import _nbd_host
    from virtua.errors import InvalidArgument

    for wildcard in ("::0", "0:0:0:0:0:0:0:0", "0", "0.0.0.0", "::"):
        assert _nbd_host(wildcard, "10.0.0.5", "import") == "10.0.0.5", wildcard
    for loopback in ("127.1", "127.0.0.2", "::1", "LOCALHOST"):
        with pytest.raises(InvalidArgument, match=f"takes NBD on {loopback} only"):
            _nbd_host(loopback, "10.0.0.5", "import")


@pytest.mark.parametrize("nbd", [
    "yes", ["10.0.0.6", 10809], {"host": "10.0.0.6", "tls": "require", "cluster_ca": True},
    {"host": "10.0.0.6", "port": "nbd", "tls": "require", "cluster_ca": True},
    {"host": "10.0.0.6", "port": 0, "tls": "require", "cluster_ca": True},
    {"host": "10.0.0.6", "port": 70000, "tls": "require", "cluster_ca": True},
    {"host": "10.0.0.6", "port": True, "tls": "require", "cluster_ca": True},
    {"host": ["10.0.0.6"], "port": 10809, "tls": "require", "cluster_ca": True},
    {"host": "10.0.0.6/x?tls-verify-peer=false#", "port": 10809, "tls": "require", "cluster_ca": True},
])
def test_what_a_serve_says_of_its_nbd_listener_is_checked_before_it_is_used(nbd: object, tmp_path: Path) -> None:
    """/v1/status is another program's answer (another version, a broken serve): a "nbd"
    that is not an object, without a port, a port that is no TCP port, a host that is no
    address was a KeyError, ValueError or AttributeError (a traceback), or went into the
    URI handed to nbdcopy as it was (its query then set nbdcopy's options). One line now."""
    import httpx

    from virtua.cli.client import RemoteClient
    from virtua.cli.data import remote_place
    from virtua.errors import Unavailable

    client = RemoteClient.__new__(RemoteClient)
    client.unix = None
    client.cert = tmp_path / "admin"
    client.http = httpx.Client(base_url="https://10.0.0.5:8780")
    client.status = lambda: {"pid": 1, "nbd": nbd}  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match="virtua serve says its NBD listens on .*: not an address and port"):
        remote_place(client, "import")
    client.nbd_place = None
    client.status = lambda: {"pid": 1}  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match="that serve is older than this CLI"):  # not "does not take NBD"
        remote_place(client, "import")
    client.status = lambda: {"pid": 1, "nbd": {"host": "10.0.0.6", "port": 10809, "tls": "require",  # type: ignore[method-assign]
                                               "cluster_ca": True}}
    place = remote_place(client, "import")  # control
    assert (place.host, place.port) == ("10.0.0.6", 10809)


def test_a_hosts_certificate_never_passes_for_the_managers_on_the_nbd_port(tmp_path: Path) -> None:
    """nbdcopy (libnbd 1.14) checks the server's certificate against the CA and the address
    only, and a host's certificate carries its address: every local agent's (and any agent
    joined on loopback) says 127.0.0.1, as the manager's does. So over --api on loopback
    (serve's own machine, or a tunnel) a process with such a key on that port got the data
    of raw imports and fed raw exports; qemu-img (tls-hostname) refused it. Now every copy
    over TCP checks the name only the manager's certificate carries; the manager: control."""
    from virtua.nbd.exports import DirectoryProvider
    from virtua.nbd.testing import ServerThread
    from virtua.nbd.tls import TLSConfig
    from virtua.pki.ca import ClusterCA
    from virtua.storage import imageio

    ca = ClusterCA.ensure(tmp_path / "pki", manager_sans=["127.0.0.1"])
    cert, key = ca.issue("host", "h1", ["127.0.0.1"])
    (tmp_path / "h1.pem").write_bytes(cert)
    (tmp_path / "h1.key").write_bytes(key)
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "disk").write_bytes(b"\x66" * (1 << 20))
    src = tmp_path / "in.raw"
    src.write_bytes(b"\x77" * (1 << 20))
    image = imageio.probe(str(src))
    for who, pem, key_file, refused in (("host", tmp_path / "h1.pem", tmp_path / "h1.key", True),
                                        ("manager", ca.manager.cert, ca.manager.key, False)):
        (exports / "disk").write_bytes(b"\x66" * (1 << 20))
        tls = TLSConfig(str(pem), str(key_file), str(tmp_path / "pki" / "ca-cert.pem"))
        with ServerThread(DirectoryProvider(str(exports)), tls=tls, tls_mode="require") as st:
            place = imageio.NbdPlace(host="127.0.0.1", port=int(st.port or 0), certs=str(tmp_path / "pki" / "admin"))
            out = tmp_path / f"{who}.raw"
            errors = [
                imageio.run_copy(imageio.export_command(place, "disk", str(out), "raw"), None),
                imageio.run_copy(imageio.import_command(image, place, "disk"), None),
                imageio.run_copy(imageio.export_command(place, "disk", str(tmp_path / f"{who}.qcow2"), "qcow2"), None),
            ]
            with open(src, "rb") as stdin:
                errors.append(imageio.run_copy(imageio.stream_import_command(place, "disk"), None, stdin=stdin.fileno()))
        if refused:
            assert all(errors), errors
            # the reason is the last line (what the CLI shows), not nbdcopy's "its qemu-nbd went away"
            assert all(e.splitlines()[-1].endswith("Certificate does not match the hostname virtua-manager")
                       for e in errors), errors
            assert (exports / "disk").read_bytes() == b"\x66" * (1 << 20), "nothing written to the impostor"
            assert not out.exists() or out.read_bytes().strip(b"\0") == b"", "nothing read from it"
        else:
            assert not any(errors), errors
            assert out.read_bytes() == b"\x66" * (1 << 20)
            assert (exports / "disk").read_bytes() == b"\x77" * (1 << 20)
