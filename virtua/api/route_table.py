"""Every admin operation's HTTP route, as one table, and the request the CLI sends for it.

ROUTES maps each operation (virtua.api.ops: `@op`, `@cluster_op`, MANAGER_METHODS) to an
HTTP method and a path template, and says which of its arguments come from the path:
``ref="{pool}/{volume}"`` makes the argument `ref` of the path parameters `pool` and
`volume`. A template parameter that is not in the path is a string field of the request
body (volume.create's `name` in ``POST /v1/pools/{pool}/volumes``). Every other argument
is a body field (POST, DELETE: one JSON object, may be empty) or a query parameter (GET:
only optional string arguments).

This module imports neither the operations nor pydantic: every CLI command through a
running daemon loads it, and start-up time is part of every command's time.
virtua.api.routes builds the daemon's endpoints from the same table and checks it
against the operations (one route each) when the daemon imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from virtua.errors import InvalidArgument
from virtua.storage.names import check_name, parse_ref

_PART = r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}"

# path parameters and template body fields: (what a person calls it, its pattern)
PARAMS: dict[str, tuple[str, str]] = {
    "pool": ("pool name", _PART),
    "volume": ("volume name", _PART),
    "snapshot": ("snapshot name", _PART),
    "image": ("VOLUME or VOLUME@SNAPSHOT", f"{_PART}(?:@{_PART})?"),
    "vc": ("VC name", _PART),
    "node": ("node name", _PART),
    "host": ("host name", _PART),
    "template": ("template name", _PART),
    "name": ("name", _PART),
    "job": ("job ID", r"[0-9a-z][0-9a-z-]{0,63}"),
}
_PARAM_RE = re.compile(r"\{(\w+)\}")
METHODS = ("GET", "POST", "DELETE")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    args: dict[str, str] = field(default_factory=dict)  # argument -> template

    @property
    def path_params(self) -> list[str]:
        return _PARAM_RE.findall(self.path)

    @property
    def fields(self) -> list[str]:
        """Template parameters that are not in the path: string fields of the body."""
        out = [p for t in self.args.values() for p in _PARAM_RE.findall(t) if p not in self.path_params]
        return list(dict.fromkeys(out))

    def arguments(self, name: str, path_params: dict[str, str], given: dict[str, Any]) -> dict[str, Any]:
        """The operation's arguments from a request's path parameters and its body (or
        query): the path-derived ones composed, everything else passed on as given."""
        out = dict(given)
        values = dict(path_params)
        for f in self.fields:
            if f not in out:
                raise InvalidArgument(f"{name}: missing argument {f!r}")
            v = out.pop(f)
            if not isinstance(v, str):
                from virtua.edge.validation import json_kind

                raise InvalidArgument(f"{name}: argument {f!r} should be a string, not {json_kind(v)}")
            values[f] = v
        for arg, template in self.args.items():
            if arg in out:
                raise InvalidArgument(f"{name}: {arg!r} is not an argument here: it comes from {self.path}")
            out[arg] = template.format(**values)
        return out

    def split(self, name: str, arg: str, value: Any) -> dict[str, str]:
        """The path parameters and fields that argument `arg` = `value` is made of
        (InvalidArgument, with the operation's own message where there is one, if none)."""
        template = self.args[arg]
        if isinstance(value, str):
            m = _template_re(template).fullmatch(value)
            if m:
                return m.groupdict()
            _explain(template, value)
        from virtua.edge.validation import json_kind

        shown = f"{value!r}" if isinstance(value, str) else json_kind(value)
        raise InvalidArgument(f"{name}: bad {arg} {shown}: expected {template.upper().replace('{', '').replace('}', '')}")


def _template_re(template: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in _PARAM_RE.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{PARAMS[m.group(1)][1]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out), re.ASCII)


def _explain(template: str, value: str) -> None:
    """Raise what the operation itself would say about a value that does not fit."""
    params = _PARAM_RE.findall(template)
    if params[:1] == ["pool"] and len(params) > 1:
        parse_ref(value, snapshot=True if "@" in template else None if "image" in params else False)
    elif params == ["vc", "node"]:
        vc, sep, node = value.partition("/")
        if not sep:
            raise InvalidArgument(f"bad VM {value!r}: expected VC/NODE, e.g. web/web-1")
        check_name(vc, "VC name")
        check_name(node, "node name")
    elif len(params) == 1:
        check_name(value, PARAMS[params[0]][0])


def R(method: str, path: str, **args: str) -> Route:  # noqa: N802 (a table row)
    return Route(method, path, args)


VOLUME = "{pool}/{volume}"
IMAGE = "{pool}/{image}"  # POOL/VOLUME or POOL/VOLUME@SNAPSHOT
SNAPSHOT = "{pool}/{volume}@{snapshot}"
_P = "/v1/pools/{pool}"
_V = _P + "/volumes/{volume}"
_I = _P + "/volumes/{image}"
_S = _V + "/snapshots/{snapshot}"

ROUTES: dict[str, Route] = {
    # pools
    "pool.create": R("POST", "/v1/pools"),
    "pool.list": R("GET", "/v1/pools"),
    "pool.info": R("GET", _P, name="{pool}"),
    "pool.rm": R("DELETE", _P, name="{pool}"),
    "pool.check": R("POST", _P + "/check", name="{pool}"),
    # volumes
    "volume.create": R("POST", _P + "/volumes", ref="{pool}/{name}"),
    "volume.list": R("GET", "/v1/volumes"),
    "volume.info": R("GET", _V, ref=VOLUME),
    "volume.rm": R("DELETE", _V, ref=VOLUME),
    "volume.resize": R("POST", _V + "/resize", ref=VOLUME),
    "volume.reset": R("POST", _V + "/reset", ref=VOLUME),
    "volume.rename": R("POST", _V + "/rename", ref=VOLUME),
    "volume.rebase": R("POST", _V + "/rebase", ref=VOLUME),
    "volume.flatten": R("POST", _V + "/flatten", ref=VOLUME),
    "volume.du": R("GET", _V + "/du", ref=VOLUME),
    "volume.status": R("GET", _V + "/status", ref=VOLUME),
    "volume.copy": R("POST", _I + "/copy", source=IMAGE),
    "volume.diff": R("GET", _I + "/diff", ref=IMAGE),
    "clone": R("POST", _I + "/clone", source=IMAGE),
    # snapshots
    "snapshot.create": R("POST", _V + "/snapshots", ref="{pool}/{volume}@{name}"),
    "snapshot.list": R("GET", _V + "/snapshots", ref=VOLUME),
    "snapshot.rm": R("DELETE", _S, ref=SNAPSHOT),
    "snapshot.rename": R("POST", _S + "/rename", ref=SNAPSHOT),
    "snapshot.protect": R("POST", _S + "/protect", ref=SNAPSHOT),
    "snapshot.rollback": R("POST", _S + "/rollback", ref=SNAPSHOT),
    # trash
    "trash.list": R("GET", "/v1/trash"),
    "trash.purge": R("POST", _P + "/trash/purge", pool="{pool}"),
    "trash.restore": R("POST", _P + "/trash/{volume}/restore", ref=VOLUME),
    # hosts
    "host.list": R("GET", "/v1/hosts"),
    "host.add": R("POST", "/v1/hosts"),
    "host.info": R("GET", "/v1/hosts/{host}", name="{host}"),
    "host.remove": R("DELETE", "/v1/hosts/{host}", name="{host}"),
    "host.drain": R("POST", "/v1/hosts/{host}/drain", name="{host}"),
    "host.undrain": R("POST", "/v1/hosts/{host}/undrain", name="{host}"),
    "host.join-token": R("POST", "/v1/join-tokens"),
    # templates
    "template.list": R("GET", "/v1/templates"),
    "template.build": R("POST", "/v1/templates"),
    "template.import": R("POST", "/v1/templates/import"),
    "template.info": R("GET", "/v1/templates/{template}", name="{template}"),
    "template.rm": R("DELETE", "/v1/templates/{template}", name="{template}"),
    # virtual clusters
    "vc.list": R("GET", "/v1/vcs"),
    "vc.create": R("POST", "/v1/vcs"),
    "vc.info": R("GET", "/v1/vcs/{vc}", name="{vc}"),
    "vc.destroy": R("DELETE", "/v1/vcs/{vc}", name="{vc}"),
    **{f"vc.{verb}": R("POST", f"/v1/vcs/{{vc}}/{verb}", name="{vc}")
       for verb in ("start", "stop", "suspend", "resume", "remap", "reset", "update")},
    # VMs and networks
    "vm.console": R("POST", "/v1/vms/{vc}/{node}/console", ref="{vc}/{node}"),
    "vm.exec": R("POST", "/v1/vms/{vc}/{node}/exec", ref="{vc}/{node}"),
    "net.list": R("GET", "/v1/networks"),
    # jobs, and the import a client drives
    "job.list": R("GET", "/v1/jobs"),
    "job.show": R("GET", "/v1/jobs/{job}", id="{job}"),
    "job.cancel": R("POST", "/v1/jobs/{job}/cancel", id="{job}"),
    "job.renew": R("POST", "/v1/jobs/{job}/renew", id="{job}"),
    "volume.import.begin": R("POST", _P + "/imports", ref="{pool}/{name}"),
    "volume.import.end": R("POST", "/v1/imports/{job}/end", id="{job}"),
    "volume.import.file": R("POST", "/v1/imports/{job}/file", id="{job}"),
    "volume.export.begin": R("POST", _I + "/exports", ref=IMAGE),
    "volume.export.end": R("POST", "/v1/exports/{job}/end", id="{job}"),
}

# The daemon's other endpoints (virtua.api.daemon.build_api): no operation may shadow them.
OTHER_ROUTES: list[tuple[str, str]] = [
    ("GET", "/v1/status"), ("GET", "/v1/join/ca"), ("POST", "/v1/join"), ("POST", "/v1/hosts/register"),
    ("POST", "/v1/hosts/{name}/heartbeat"), ("GET", "/v1/templates/{name}/{which}"),
    ("PUT", "/v1/vmstate/{vc}/{node}"), ("GET", "/v1/vmstate/{vc}/{node}"),
]


def _may_overlap(a: str, b: str) -> bool:
    """Whether one request path could match both templates (a parameter matches any segment)."""
    sa, sb = a.strip("/").split("/"), b.strip("/").split("/")
    return len(sa) == len(sb) and all(x == y or _PARAM_RE.fullmatch(x) or _PARAM_RE.fullmatch(y)
                                      for x, y in zip(sa, sb, strict=True))


# ---------------------------------------------------------------------- the CLI's side


@dataclass(frozen=True)
class HTTPRequest:
    method: str
    path: str  # percent-encoded
    query: dict[str, str] | None = None
    body: dict[str, Any] | None = None


def request_for(name: str, args: dict[str, Any]) -> HTTPRequest:
    """The HTTP request that runs operation `name` with `args` (what ops.run would get)."""
    route = ROUTES.get(name)
    if route is None:
        raise InvalidArgument(f"unknown operation {name!r}")
    rest = dict(args)
    values: dict[str, str] = {}
    for arg in route.args:
        if arg not in rest:
            raise InvalidArgument(f"{name}: missing argument {arg!r}")
        values.update(route.split(name, arg, rest.pop(arg)))
    path = route.path.format(**{p: quote(values[p], safe="") for p in route.path_params})
    payload = {**{f: values[f] for f in route.fields}, **rest}
    if route.method != "GET":
        return HTTPRequest(route.method, path, body=payload)
    query: dict[str, str] = {}
    for k, v in payload.items():
        if v is None:  # a GET's arguments are optional strings: None is the default
            continue
        if not isinstance(v, str):
            raise InvalidArgument(f"{name}: argument {k!r} should be a string or null")
        query[k] = v
    return HTTPRequest(route.method, path, query=query)
