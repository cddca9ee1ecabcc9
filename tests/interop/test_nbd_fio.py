"""fio's nbd engine (libnbd) with data verification against virtua."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.interop


def _fio(sh, uri: str, *extra: str) -> dict:
    # --verify_state_save=0: fio would otherwise leave local-*-verify.state in the cwd
    p = sh(["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
            "--verify_state_save=0",
            *extra], timeout=120)
    text = p.stdout[p.stdout.index("{"):]
    return json.loads(text)


@pytest.mark.parametrize("bs,depth", [("4k", 32), ("64k-1m", 8)])
def test_fio_randwrite_verify_crc32c(nbd_server, sh, bs, depth):
    srv = nbd_server()
    if "-" in bs:
        sizes = ["--bsrange=" + bs]
    else:
        sizes = ["--bs=" + bs]
    j = _fio(sh, srv.uri(), "--rw=randwrite", *sizes, f"--iodepth={depth}", "--size=48m",
             "--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
    job = j["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 48 * 1024 * 1024
    assert job["read"]["io_bytes"] > 0  # the verify pass read everything back


def test_fio_two_connections_verify(nbd_server, sh):
    srv = nbd_server()
    j = _fio(sh, srv.uri(), "--rw=randwrite", "--bs=16k", "--iodepth=16", "--size=16m",
             "--numjobs=2", "--offset_increment=24m", "--verify=crc32c", "--do_verify=1",
             "--verify_fatal=1")
    assert all(job["error"] == 0 for job in j["jobs"])
