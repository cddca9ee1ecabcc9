"""serve on a real etcd, attacked: a VC too large for one etcd transaction is refused
before anything is made; two clusters on one etcd under two prefixes see nothing of
each other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_support import Serve, V
from tests.helpers.etcd import solo_etcd

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def etcd() -> Iterator[str]:
    with solo_etcd() as url:
        yield url


def test_a_vc_past_etcds_transaction_limit_is_refused_before_anything_is_made(tmp_path: Path, etcd: str) -> None:
    """etcd's default --max-txn-ops is 128 and recording a VC is one put per node, one
    for the VC and one for the store's transaction marker: `vc create --nodes 200` cloned 400 volumes, wrote 200 seeds and then failed
    at its last step. Now it is refused up front, saying the limit and what to change;
    told of a larger limit (--etcd-max-txn-ops), serve goes on to the next check."""
    v = V(tmp_path / "home")
    serve = Serve(v.home, "--etcd", etcd, "--etcd-prefix", "/a1/")
    try:
        line = v.fails(2, "vc", "create", "big", "--template", "none", "--nodes", "200", match="--max-txn-ops")
        assert "202 operations" in line and "allows 128" in line and "--etcd-max-txn-ops" in line, line
        assert v.json("job", "list", "--all") == [], "no job: nothing was started"
        v.fails(3, "vc", "create", "ok", "--template", "none", "--nodes", "126", match="template")  # control: it fits
    finally:
        serve.stop()
    serve = Serve(v.home, "--etcd", etcd, "--etcd-prefix", "/a1/", "--etcd-max-txn-ops", "2048")
    try:
        v.fails(3, "vc", "create", "big", "--template", "none", "--nodes", "200", match="template")
    finally:
        serve.stop()


def test_a_second_serve_on_the_same_prefix_is_refused(tmp_path: Path, etcd: str) -> None:
    """Two `serve --etcd` on one prefix were both managers of one cluster: both restart a
    lost host's VMs (a VM twice), each with its own CA and job journal. The second is now
    refused while the first runs, and so is a prefix inside or around a running one's; a
    first serve killed leaves the prefix free once its claim's lease runs out."""
    import time

    a, b = V(tmp_path / "a"), V(tmp_path / "b")
    first = Serve(a.home, "--etcd", etcd, "--etcd-prefix", "/twice/", "--lease-ttl", "4")
    try:
        for prefix in ("/twice/", "/twice/inner/", "/"):
            r = b.run("serve", "--no-agent", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0",
                      "--etcd", etcd, "--etcd-prefix", prefix, ok=False, timeout=60)
            err = r.stderr.decode()
            assert r.returncode == 8, (prefix, r.returncode, err)
            assert "another virtua serve" in err and "/twice" in err and "Traceback" not in err, err
        other = Serve(b.home, "--etcd", etcd, "--etcd-prefix", "/twice2/")  # control: a prefix of its own
        other.stop()
        first.proc.kill()  # no clean-up: its claim goes when its lease runs out
        first.proc.wait()
        deadline = time.monotonic() + 30
        while True:
            try:
                second = Serve(b.home, "--etcd", etcd, "--etcd-prefix", "/twice/")
                break
            except AssertionError as e:
                assert "another virtua serve" in str(e) and time.monotonic() < deadline, e
                time.sleep(0.5)
        second.stop()
    finally:
        first.stop()


def test_a_killed_serve_restarted_on_its_own_home_takes_its_claim_back_at_once(tmp_path: Path, etcd: str) -> None:
    """serve SIGKILLed leaves its claim until the claim's lease runs out; the same home on
    the same host restarted at once (holding the home's lock, so the old one is gone) takes
    it over instead of waiting the lease out, while another home still has to wait."""
    a, b = V(tmp_path / "a"), V(tmp_path / "b")
    first = Serve(a.home, "--etcd", etcd, "--etcd-prefix", "/again/", "--lease-ttl", "30")
    first.proc.kill()
    first.proc.wait()
    r = b.run("serve", "--no-agent", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0",
              "--etcd", etcd, "--etcd-prefix", "/again/", ok=False, timeout=60)
    assert r.returncode == 8 and "another virtua serve" in r.stderr.decode(), r.stderr.decode()
    again = Serve(a.home, "--etcd", etcd, "--etcd-prefix", "/again/", "--lease-ttl", "30")  # at once: no Busy
    try:
        assert a.json("host", "list") == []  # it answers, from etcd
        r = b.run("serve", "--no-agent", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0",
                  "--etcd", etcd, "--etcd-prefix", "/again/", ok=False, timeout=60)
        assert r.returncode == 8, "the restarted serve holds the claim"
    finally:
        again.stop()
