"""The daemon's side of the route table (virtua.api.route_table: every operation's HTTP
method, path and which arguments come from the path; the CLI's requests are built from it).

Here the table becomes the daemon's endpoints (`add_routes`, which hands the arguments to
ops.run: the one place that validates and runs) and their OpenAPI description, so the
daemon and the CLI cannot drift. The table is checked when the daemon imports this
module: one route per operation, none for an operation that does not exist, no two
routes that can match the same request.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from virtua.api import ops
from virtua.api.route_table import (  # noqa: F401 - re-exported: the table's names are the routes'
    _PARAM_RE,
    METHODS,
    OTHER_ROUTES,
    PARAMS,
    ROUTES,
    HTTPRequest,
    R,
    Route,
    _may_overlap,
    request_for,
)
from virtua.errors import InvalidArgument


def check_table(routes: dict[str, Route] = ROUTES) -> None:
    """Raise RuntimeError unless `routes` has one route per operation and no route is
    ambiguous, unmapped or badly formed (at import, and in the unit tests)."""
    names = set(ops.operation_names())
    problems = [f"operation {n} has no route" for n in sorted(names - set(routes))]
    problems += [f"route for unknown operation {n}" for n in sorted(set(routes) - names)]
    everything = [(r.method, r.path, n) for n, r in routes.items()] + [(m, p, "") for m, p in OTHER_ROUTES]
    for i, (m1, p1, n1) in enumerate(everything):
        for m2, p2, n2 in everything[i + 1:]:
            if m1 == m2 and _may_overlap(p1, p2) and (n1 or n2):
                problems.append(f"{m1} {p1} ({n1 or 'daemon'}) and {p2} ({n2 or 'daemon'}) can match one request")
    for n, r in routes.items():
        if r.method not in METHODS:
            problems.append(f"{n}: method {r.method}")
        if not r.path.startswith("/v1/"):
            problems.append(f"{n}: path {r.path} is not under /v1/")
        used = {p for t in r.args.values() for p in _PARAM_RE.findall(t)}
        for p in sorted((used | set(r.path_params)) - set(PARAMS)):
            problems.append(f"{n}: unknown parameter {{{p}}}")
        for p in r.path_params:
            if p not in used:
                problems.append(f"{n}: path parameter {{{p}}} makes no argument")
        if len(set(r.path_params)) != len(r.path_params):
            problems.append(f"{n}: a path parameter twice in {r.path}")
        if r.method == "GET" and r.fields:
            problems.append(f"{n}: a GET has no body for {r.fields}")
    if problems:
        raise RuntimeError("virtua.api.routes: " + "; ".join(problems))


check_table()


# ---------------------------------------------------------------------- the daemon's side


class ErrorBody(BaseModel):
    """Every answer that is not a success (virtua.errors: the category and one line)."""

    error: str
    message: str


class PoolInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
    chunk_size: int
    capacity: int
    used: int
    free: int
    used_percent: float
    provisioned: int
    overcommit: float
    volumes: int
    snapshots: int
    filesystem_size: int
    warning: str | None = None


class VolumeInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str  # POOL/VOLUME
    size: int
    allocated: int
    unique: int
    shared: int
    origin: str | None  # POOL/VOLUME@SNAPSHOT it was cloned from
    children: list[str]
    snapshots: list[str]
    created: float
    copied: int | None = None  # volume.copy, volume.flatten: bytes copied


class FlattenDone(VolumeInfo):
    job: str  # the recorded job (`virtua job show`)


class JobStarted(BaseModel):
    """A long operation asked not to wait: its job runs on in the daemon."""

    model_config = ConfigDict(extra="forbid")
    job: str
    name: str
    state: str


class SnapshotInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str  # POOL/VOLUME@SNAPSHOT
    size: int
    created: float
    clones: list[str]
    protected: bool


_VOLUME_RESULTS = ("volume.create", "volume.info", "volume.resize", "volume.reset", "volume.rename",
                   "volume.copy", "volume.rebase", "snapshot.rollback", "trash.restore")
# operations whose result has a stable shape; the others are documented as an object or an array
RESULTS: dict[str, Any] = {
    "pool.create": PoolInfo, "pool.info": PoolInfo, "pool.list": list[PoolInfo],
    **dict.fromkeys(_VOLUME_RESULTS, VolumeInfo), "volume.list": list[VolumeInfo],
    "volume.flatten": FlattenDone | JobStarted,
    "snapshot.create": SnapshotInfo, "snapshot.rename": SnapshotInfo, "snapshot.protect": SnapshotInfo,
    "snapshot.list": list[SnapshotInfo],
}
LIST_RESULTS = {"pool.list", "volume.list", "volume.du", "snapshot.list", "trash.list", "host.list",
                "template.list", "vc.list", "net.list"}
_ERRORS = {400: "InvalidArgument", 401: "Unauthenticated", 403: "Forbidden or ReadOnly", 404: "NotFound",
           409: "AlreadyExists, DependencyError or PlacementError", 423: "Busy", 500: "an internal error",
           503: "Unavailable", 507: "NoSpace"}


def _function(name: str, manager_type: type | None) -> Callable[..., Any] | None:
    fn = ops.OPS.get(name) or ops.CLUSTER_OPS.get(name)
    if fn is None and manager_type is not None and name in ops.MANAGER_METHODS:
        fn = getattr(manager_type, ops.MANAGER_METHODS[name])
    return fn


def body_schema(name: str, manager_type: type) -> dict[str, Any]:
    """The JSON schema of the request body (or the query) of operation `name`: its argument
    model without the path's arguments and the transport's, with the template fields."""
    route = ROUTES[name]
    schema = ops.argument_model(name, manager_type).model_json_schema()
    if "$defs" in schema:  # the document inlines each body: a nested model would need components
        raise RuntimeError(f"{name}: its arguments' schema has $defs")
    # a default of None says nothing more than "optional" (and the document drops it)
    props = {k: {a: b for a, b in v.items() if not (a == "default" and b is None)}
             for k, v in schema.get("properties", {}).items() if k not in route.args and k not in TRANSPORT_ARGUMENTS}
    required = [k for k in schema.get("required", []) if k in props]
    for f in route.fields:
        props[f] = {"type": "string", "title": f.title(), "pattern": f"^{PARAMS[f][1]}$",
                    "description": f"the new object's {PARAMS[f][0]}"}
        required.append(f)
    out: dict[str, Any] = {"type": "object", "title": f"{name} request", "properties": props,
                           "additionalProperties": False}
    if required:
        out["required"] = required
    return out


# the transport supplies these (ops.HOST_PATH_OPS, ops.LOCAL_FILE_OPS): a request naming one is refused
TRANSPORT_ARGUMENTS = frozenset({"caller_is_admin", "caller_is_local"})


def _openapi(name: str, route: Route, manager_type: type) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": p, "in": "path", "required": True, "description": PARAMS[p][0],
         "schema": {"type": "string", "pattern": f"^{PARAMS[p][1]}$"}} for p in route.path_params
    ]
    schema = body_schema(name, manager_type)
    extra: dict[str, Any] = {"parameters": params}
    if route.method == "GET":
        for k, prop in schema["properties"].items():
            params.append({"name": k, "in": "query", "required": k in schema.get("required", []), "schema": prop})
    else:
        extra["requestBody"] = {"required": bool(schema.get("required")),
                                "content": {"application/json": {"schema": schema}}}
    return extra


def _responses(name: str) -> dict[int | str, dict[str, Any]]:
    result = RESULTS.get(name)
    ok: dict[str, Any] = {"description": "the operation's result"}
    if result is not None:
        ok["model"] = result
    else:
        shape = {"type": "array", "items": {"type": "object"}} if name in LIST_RESULTS else {"type": "object"}
        ok["content"] = {"application/json": {"schema": shape}}
    out: dict[int | str, dict[str, Any]] = {200: ok}
    for status, what in _ERRORS.items():
        out[status] = {"model": ErrorBody, "description": what}
    return out


Run = Callable[[str, dict[str, Any], Any], Any]  # (operation, arguments, request) -> result or awaitable


async def request_arguments(name: str, route: Route, request: Any) -> dict[str, Any]:
    """The operation's arguments in a request: a GET's query, or the body read up to
    virtua.edge.web.MAX_BODY as one JSON object; with the path's arguments composed."""
    from virtua.edge import web

    params = dict(request.path_params)
    if route.method == "GET":
        given: dict[str, Any] = {}
        for k, v in request.query_params.multi_items():
            if k in given:
                raise InvalidArgument(f"{name}: argument {k!r} is given twice")
            given[k] = v
        strings = [*params.values(), *given, *given.values()]
    else:
        given = web.parse_json_object(await web.read_body(request), name)
        strings = list(params.values())
    if any("\0" in v for v in strings):
        raise InvalidArgument(f"{name}: the request's path or query contains NUL")
    return route.arguments(name, params, given)


def add_routes(api: Any, run: Run, manager_type: type) -> None:
    """One endpoint per operation on the FastAPI app `api`. Arguments are only gathered
    here; `run` (ops.run) validates and runs them, and every VirtuaError is answered in
    the error tree's shape (virtua.edge.web.error_response)."""
    from fastapi import Request

    from virtua.edge import web
    from virtua.errors import VirtuaError

    check_table()
    for name, route in ROUTES.items():
        if route.method == "GET":
            model = ops.argument_model(name, manager_type)
            bad = [k for k in body_schema(name, manager_type)["properties"]
                   if not _optional_string(model.model_fields[k].annotation)]
            if bad:
                raise RuntimeError(f"{name}: a GET's query arguments are optional strings, not {bad}")

        def endpoint_for(name: str, route: Route) -> Callable[..., Any]:
            # async on purpose: runs on the loop thread, never beside an NBD request
            async def endpoint(request: Request) -> Any:
                try:
                    result = run(name, await request_arguments(name, route, request), request)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                except VirtuaError as e:
                    return web.error_response(e)

            endpoint.__annotations__ = {"request": Request, "return": Any}  # resolved: imported here, not globally
            return endpoint

        fn = _function(name, manager_type)
        doc = inspect.getdoc(fn) if fn is not None else None
        api.add_api_route(
            route.path, endpoint_for(name, route), methods=[route.method], name=name, operation_id=name,
            summary=f"{name} (`virtua {name.replace('.', ' ')}`)",
            description=doc or f"The `{name}` operation.",
            tags=[name.partition(".")[0] if "." in name else "volume"], response_model=None,
            responses=_responses(name), openapi_extra=_openapi(name, route, manager_type),
        )


def _optional_string(tp: Any) -> bool:
    return set(typing.get_args(tp)) == {str, type(None)}


__all__ = ["OTHER_ROUTES", "ROUTES", "HTTPRequest", "Route", "add_routes", "body_schema", "check_table",
           "request_for"]
