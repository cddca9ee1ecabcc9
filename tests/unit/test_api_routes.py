"""The operations' HTTP routes (virtua.api.routes): one per operation, none more; the
OpenAPI document describes each one's path parameters and request body; what the CLI
sends (request_for) reaches the operation as the arguments it was given; the documented
result models are what the operations return."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import TypeAdapter

from virtua.api import ops, routes
from virtua.api.daemon import build_api
from virtua.api.routes import (
    OTHER_ROUTES,
    ROUTES,
    TRANSPORT_ARGUMENTS,
    PoolInfo,
    Route,
    SnapshotInfo,
    VolumeInfo,
    request_for,
)
from virtua.cluster.manager import Manager
from virtua.storage.service import Storage


def test_every_operation_has_exactly_one_route() -> None:
    assert set(ROUTES) == set(ops.operation_names())
    assert len(ROUTES) == len(ops.operation_names()) > 40
    pairs = [(r.method, r.path) for r in ROUTES.values()]
    assert len(set(pairs)) == len(pairs)
    routes.check_table()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda t: t.pop("volume.info"), "operation volume.info has no route"),
        (lambda t: t.__setitem__("volume.frob", Route("POST", "/v1/frob")), "route for unknown operation volume.frob"),
        (lambda t: t.__setitem__("pool.info", Route("GET", "/v1/pools/{pool}/volumes/all", {"name": "{pool}"})),
         "can match one request"),
        (lambda t: t.__setitem__("host.info", Route("POST", "/v1/hosts/{host}", {"name": "{host}"})),
         "/v1/hosts/register (daemon) can match one request"),
        (lambda t: t.__setitem__("pool.info", Route("GET", "/v1/pools/{pool}/x/{volume}", {"name": "{pool}"})),
         "path parameter {volume} makes no argument"),
        (lambda t: t.__setitem__("pool.info", Route("GET", "/v1/pools/{zone}", {"name": "{zone}"})),
         "unknown parameter {zone}"),
        (lambda t: t.__setitem__("volume.info", Route("GET", "/v1/x/{pool}", {"ref": "{pool}/{name}"})),
         "a GET has no body"),
        (lambda t: t.__setitem__("pool.list", Route("PATCH", "/v1/pools")), "method PATCH"),
    ],
)
def test_the_table_check_finds_each_problem(change: Any, problem: str) -> None:
    table = dict(ROUTES)
    change(table)
    with pytest.raises(RuntimeError, match=re.escape(problem)):
        routes.check_table(table)


def _app_with_other_routes(tmp_path: Path) -> FastAPI:
    """The daemon's app with its cluster endpoints (a Manager that is never started)."""
    manager = Manager.__new__(Manager)  # build_api only reads its type and its authority (none)
    app: FastAPI = build_api(Storage(tmp_path), manager)
    return app


def test_openapi_documents_every_operation(tmp_path: Path) -> None:
    app = _app_with_other_routes(tmp_path)
    doc = app.openapi()
    found: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if operation.get("operationId") in ROUTES:
                found[operation["operationId"]] = (method.upper(), path, operation)
    assert set(found) == set(ROUTES)
    for name, (method, path, operation) in found.items():
        route = ROUTES[name]
        assert (method, path) == (route.method, route.path), name
        params = {p["name"]: p for p in operation["parameters"]}
        for p in route.path_params:
            assert params[p]["in"] == "path" and params[p]["required"] and params[p]["schema"]["pattern"], name
        body = routes.body_schema(name, Manager)
        if method == "GET":
            assert "requestBody" not in operation, name
            assert {k for k, p in params.items() if p["in"] == "query"} == set(body["properties"]), name
        else:
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert schema == body and schema["additionalProperties"] is False, name
        # no argument of the operation is left undocumented: path, template field, body or query
        model = ops.argument_model(name, Manager)
        assert not set(route.fields) & set(model.model_fields), f"{name}: a template field shadows an argument"
        assert set(model.model_fields) - TRANSPORT_ARGUMENTS == set(route.args) | set(body["properties"]) - set(
            route.fields), name
        assert {"200", "400", "404", "409"} <= set(operation["responses"]), name
    # the example of the issue: volume.create's body
    _, _, create = found["volume.create"]
    schema = create["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["size", "name"]
    assert {s["type"] for s in schema["properties"]["size"]["anyOf"]} == {"string", "integer"}
    assert schema["properties"]["name"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"
    assert "ref" not in schema["properties"]
    assert create["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/VolumeInfo"}
    _, _, console = found["vm.console"]
    offset = console["requestBody"]["content"]["application/json"]["schema"]["properties"]["offset"]
    assert offset["minimum"] == 0 and offset["type"] == "integer"
    _, _, imp = found["template.import"]
    assert "caller_is_admin" not in imp["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(doc["components"]["schemas"]["VolumeInfo"]["properties"]) >= {"name", "size", "allocated", "origin"}
    assert not any("/v1/ops" in p for p in doc["paths"])
    # every endpoint of the app is an operation's or one of the daemon's others, nothing else
    served = {(m, r.path) for r in app.routes if hasattr(r, "methods") and r.path.startswith("/v1/")
              for m in r.methods}
    assert served == {(r.method, r.path) for r in ROUTES.values()} | set(OTHER_ROUTES)


# arguments for every operation: path-derived ones with names that need encoding, and
# a body or query argument where the operation has one
ARGS: dict[str, dict[str, Any]] = {
    "volume.create": {"ref": "p.1/v+x", "size": "1M"},
    "volume.copy": {"source": "p/v@s+1", "new": "w"},
    "clone": {"source": "p/v", "new": "p/c", "count": 2},
    "volume.diff": {"ref": "p/v@s", "since": "a"},
    "volume.list": {"pool": "p"},
    "snapshot.create": {"ref": "p/v@s.1"},
    "vm.console": {"ref": "web/web-1", "offset": 3},
    "volume.rm": {"ref": "p/v", "recursive": True, "keep": 3.5},
    "pool.create": {"name": "p", "capacity": 1 << 30},
}


def _sample(name: str) -> dict[str, Any]:
    if name in ARGS:
        return ARGS[name]
    route = ROUTES[name]
    values = {"pool": "p", "volume": "v", "snapshot": "s", "image": "v", "vc": "x", "node": "x-1",
              "host": "register", "template": "kernel", "name": "n", "job": "20261201-000000-abcdef"}
    return {arg: template.format(**values) for arg, template in route.args.items()}


def test_what_the_client_sends_reaches_the_operation_unchanged() -> None:
    """request_for and the daemon's endpoints are inverses, for every operation."""
    api = FastAPI()
    seen: list[tuple[str, dict[str, Any]]] = []

    def run(name: str, args: dict[str, Any], request: Any) -> Any:
        seen.append((name, args))
        return {"ok": name}

    routes.add_routes(api, run, Manager)
    client = TestClient(api)
    for name in ROUTES:
        args = _sample(name)
        req = request_for(name, args)
        r = client.request(req.method, req.path, params=req.query, json=req.body)
        assert r.status_code == 200 and r.json() == {"ok": name}, (name, req, r.text)
        assert seen[-1] == (name, args), (name, req)
    assert len(seen) == len(ROUTES)
    assert request_for("volume.create", ARGS["volume.create"]) == routes.HTTPRequest(
        "POST", "/v1/pools/p.1/volumes", body={"name": "v+x", "size": "1M"})
    assert request_for("volume.copy", ARGS["volume.copy"]).path == "/v1/pools/p/volumes/v%40s%2B1/copy"
    assert request_for("volume.diff", ARGS["volume.diff"]) == routes.HTTPRequest(
        "GET", "/v1/pools/p/volumes/v%40s/diff", query={"since": "a"})
    assert request_for("volume.diff", {"ref": "p/v", "since": None}).query == {}


def test_the_documented_results_are_what_the_operations_return(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    try:
        def check(model: Any, value: Any) -> None:
            TypeAdapter(model).validate_python(value, strict=True)

        check(PoolInfo, ops.run(st, "pool.create", {"name": "p", "capacity": "64M"}))
        check(VolumeInfo, ops.run(st, "volume.create", {"ref": "p/v", "size": "1M"}))
        check(SnapshotInfo, ops.run(st, "snapshot.create", {"ref": "p/v@s"}))
        check(SnapshotInfo, ops.run(st, "snapshot.protect", {"ref": "p/v@s"}))
        check(VolumeInfo, ops.run(st, "volume.copy", {"source": "p/v@s", "new": "w"}))
        ops.run(st, "clone", {"source": "p/v@s", "new": "p/c"})
        check(routes.FlattenDone, ops.run(st, "volume.flatten", {"ref": "p/c"}))
        for name, args in [("pool.info", {"name": "p"}), ("pool.list", {}), ("volume.info", {"ref": "p/v"}),
                           ("volume.list", {}), ("snapshot.list", {"ref": "p/v"}),
                           ("volume.resize", {"ref": "p/v", "size": "2M"}),
                           ("snapshot.rollback", {"ref": "p/v@s"})]:
            check(routes.RESULTS[name], ops.run(st, name, args))
        with pytest.raises(Exception, match="extra"):  # the models say what is there, no more
            check(VolumeInfo, {**ops.run(st, "volume.info", {"ref": "p/v"}), "surprise": 1})
    finally:
        st.close()


def test_route_rows_are_plain_data() -> None:
    assert all(dataclasses.is_dataclass(r) for r in ROUTES.values())
    assert ROUTES["volume.create"] == Route("POST", "/v1/pools/{pool}/volumes", {"ref": "{pool}/{name}"})
    assert ROUTES["volume.create"].fields == ["name"] and ROUTES["volume.info"].fields == []
