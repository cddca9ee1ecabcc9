"""Jobs attacked: recovery that must not take back what the job did not make (a volume
re-created under the same name after a crash), two recoverers at once, a journal that is
not a database. Real `virtua serve`, real CLI subprocesses, real SIGKILLs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cli_support import Serve, V

pytestmark = pytest.mark.interop

MIB = 1 << 20


@pytest.fixture
def v(tmp_path: Path) -> V:
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "1G")
    cli.run("volume", "create", "p/base", "--size", "8M")
    return cli


def wait_for(cond, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def api(v: V) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(v.home / "virtua.sock")), base_url="http://virtua",
                        timeout=30)


def job(v: V, job_id: str) -> dict[str, Any]:
    return v.json("job", "show", job_id)  # type: ignore[no-any-return]


def volumes(v: V) -> dict[str, dict[str, Any]]:
    return {x["name"]: x for x in v.json("volume", "list")}


def test_the_reaper_keeps_a_volume_re_created_after_its_import_went_quiet(v: V) -> None:
    """A client begins an import and goes quiet (killed); the operator removes the half
    volume and makes a new one of the same name before the job's lease runs out. The
    reaper then undoes the job: it must not remove the operator's volume."""
    serve = Serve(v.home, env={"VIRTUA_JOB_LEASE": "6"})
    try:
        with api(v) as http:
            r = http.post("/v1/pools/p/imports", json={"name": "again", "size": MIB})
            assert r.status_code == 200, r.text
            job_id = r.json()["job"]
        v.run("volume", "rm", "p/again")
        v.run("volume", "create", "p/again", "--size", "2M")
        assert job(v, job_id)["state"] == "running", "control: the lease has not run out yet"
        wait_for(lambda: job(v, job_id)["state"] != "running", "the reaper to undo the quiet import", 20)
        assert "p/again" in volumes(v), "the operator's new volume was removed by the old job's undo"
        assert volumes(v)["p/again"]["size"] == 2 * MIB
        assert v.json("pool", "check", "p")["ok"]
    finally:
        serve.stop()
