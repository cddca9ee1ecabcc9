"""Request bodies as data, without the web framework: one JSON object (no NaN/Infinity
constants, no duplicate keys, no string with a NUL or a lone surrogate: they cannot
become file names, command lines or UTF-8 again), validated against a pydantic model
with one readable message. The CLI's offline path and the API share it; importing it
costs no FastAPI start-up.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Any, TypeVar, Union

from pydantic import BaseModel, ValidationError

from virtua.errors import InvalidArgument

_M = TypeVar("_M", bound=BaseModel)


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
