"""The HTTP edges of the daemon's and the agent's APIs: bounded JSON bodies, and one JSON
error shape (virtua.errors' to_dict) for every answer that is not a success -- unknown
paths, wrong methods and unexpected exceptions included.

A body is read up to a limit (the Content-Length is checked before reading anything) and
must be one JSON object: no NaN/Infinity constants, no duplicate keys, no string with a
NUL or a lone surrogate (they cannot become file names, command lines or UTF-8 again).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from virtua.edge.validation import (
    describe_errors,
    json_kind,
    parse_json_object,
    type_name,
    validated,
)
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


async def json_object(request: Request, what: str, limit: int = MAX_BODY) -> dict[str, Any]:
    return parse_json_object(await read_body(request, limit), what)



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
