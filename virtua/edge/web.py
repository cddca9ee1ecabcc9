"""The HTTP edges of the daemon's and the agent's APIs: bounded JSON bodies, and one JSON
error shape (virtua.errors' to_dict) for every answer that is not a success -- unknown
paths, wrong methods and unexpected exceptions included.

A body is read up to a limit (the Content-Length is checked before reading anything) and
must be one JSON object: no NaN/Infinity constants, no duplicate keys, no string with a
NUL or a lone surrogate (they cannot become file names, command lines or UTF-8 again).
"""

from __future__ import annotations

import json
import logging
import types
import typing
from typing import Annotated, Any, TypeVar, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from virtua.errors import InvalidArgument, NotFound, VirtuaError

MAX_BODY = 1 << 20  # bytes of a JSON request body
_M = TypeVar("_M", bound=BaseModel)


def error_response(e: VirtuaError) -> JSONResponse:
    return JSONResponse(e.to_dict(), status_code=e.http_status)


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The whole body, refused as soon as it is known to pass `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isascii() or not length.isdigit():
            raise InvalidArgument(f"bad Content-Length {length[:40]!r}")
        if int(length) > limit:
            raise InvalidArgument(f"request body of {int(length)} bytes is over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidArgument(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _check_strings(value: Any, what: str) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\0" in v:
                raise InvalidArgument(f"{what}: a string in the request body contains NUL")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f"{what}: a string in the request body is not valid Unicode (lone surrogate)") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def parse_json_object(body: bytes, what: str) -> dict[str, Any]:
    """`body` as a JSON object ({} if empty), or InvalidArgument naming `what`."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise InvalidArgument(f"{what}: the request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise InvalidArgument(f"{what}: the request body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: the request body must be a JSON object, not {json_kind(value)}")
    _check_strings(value, what)
    return value


async def json_object(request: Request, what: str, limit: int = MAX_BODY) -> dict[str, Any]:
    return parse_json_object(await read_body(request, limit), what)


def validated(model: type[_M], body: dict[str, Any], what: str) -> _M:
    """`body` as a `model` (strict: JSON types as they are, no unknown keys), or one
    InvalidArgument line naming `what`, the argument and what it expected."""
    try:
        return model.model_validate(body, strict=True)
    except ValidationError as e:
        raise InvalidArgument(f"{what}: {describe_errors(e, model)}") from None


def describe_errors(e: ValidationError, model: type[BaseModel]) -> str:
    """One line: the first problem of each argument, in order."""
    seen: dict[str, str] = {}
    for err in e.errors():
        # pydantic tags the members of a union ("size", "str"): not part of the path
        loc = list(err["loc"][:1]) + [p for p in err["loc"][1:] if not (isinstance(p, str) and p in _UNION_TAGS)]
        arg = str(loc[0]) if loc else "arguments"
        if arg in seen:
            continue
        kind = err["type"]
        shown = _show(err.get("input"))
        field = model.model_fields.get(arg)
        if kind == "missing" and len(loc) == 1:
            seen[arg] = f"missing argument {arg!r}"
        elif kind == "extra_forbidden" and len(loc) == 1:
            known = ", ".join(model.model_fields) or "none"
            seen[arg] = f"unknown argument {arg!r} (arguments: {known})"
        elif len(loc) == 1 and field is not None and kind in _TYPE_ERRORS:
            seen[arg] = f"argument {arg!r} should be {type_name(field.annotation)}, not {shown}"
        else:  # a constraint ("should be >= 0") or a problem inside a list or an object
            path = ".".join(str(p) for p in loc)
            what = err["msg"][0].lower() + err["msg"][1:]
            seen[arg] = f"argument {path!r}: {what}" + ("" if kind in ("missing", "extra_forbidden") else f", not {shown}")
    return "; ".join(seen.values())


_UNION_TAGS = {"str", "int", "bool", "float", "none", "list[str]", "dict[str,any]"}
_TYPE_ERRORS = {"string_type", "int_type", "bool_type", "float_type", "list_type", "dict_type",
                "none_required", "int_from_float", "union_tag_invalid", "model_type"}


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


_NAMES: dict[Any, str] = {str: "a string", int: "an integer", bool: "true or false", float: "a number",
                          type(None): "null"}


def type_name(tp: Any) -> str:
    """How a person says a type: "a string or an integer", "a list of strings"."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, set):
        (inner, *_rest) = typing.get_args(tp) or (Any,)
        return f"a list of {type_name(inner).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "an object"
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))




class InternalErrors:
    """ASGI middleware: an exception no endpoint expected is logged with its traceback and
    answered 500 with the error tree's shape, never a bare text page."""

    def __init__(self, app: Any, log: logging.Logger) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            self.log.exception("internal error in %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for an error body: the client sees a cut-off response
                return
            err = VirtuaError(f"internal error ({type(e).__name__}) in {scope.get('method')} "
                              f"{scope.get('path')}; the server's log has the details")
            await error_response(err)(scope, receive, send)


def install(api: FastAPI, log: logging.Logger) -> None:
    """Every error answer of `api` in the error tree's shape."""

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            return error_response(NotFound(f"no such endpoint: {where}"))
        if exc.status_code == 405:
            resp = error_response(InvalidArgument(f"method not allowed: {where}"))
            resp.status_code = 405
            return resp
        err = VirtuaError(f"{where}: {exc.detail}")
        return JSONResponse(err.to_dict(), status_code=exc.status_code)

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(InvalidArgument(f"{request.method} {request.url.path}: {loc}: {first.get('msg', 'invalid')}"))

    api.add_middleware(InternalErrors, log=log)


__all__ = [
    "MAX_BODY", "InternalErrors", "describe_errors", "error_response", "install", "json_kind", "json_object",
    "parse_json_object", "read_body", "type_name", "validated",
]
