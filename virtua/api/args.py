"""Operation arguments checked at the edge, from each operation's own signature.

Every operation is a function whose first parameter is what it runs against (the
Storage, the Manager) and whose other parameters are its arguments, each annotated with
a concrete type. From that signature we build a strict pydantic model once: JSON types
only as they are (true is not 1, "3" is not 3, 3.5 is not an int), no unknown argument,
no NaN or infinity. A request that does not fit it is one InvalidArgument line naming
the operation, the argument and what it expected; it never reaches the operation.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from virtua.edge.validation import describe_errors, json_kind
from virtua.errors import InvalidArgument

_CONFIG = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def arguments_model(fn: Callable[..., Any], name: str, *, skip_first: bool = True) -> type[BaseModel]:
    """The strict model of `fn`'s arguments; TypeError (at registration) for a parameter
    that cannot be checked: no annotation, Any, *args or **kwargs."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params = list(inspect.signature(fn).parameters.values())
    if skip_first:
        params = params[1:]
    fields: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"operation {name}: *{p.name} cannot be validated; name every argument")
        hint = hints.get(p.name)
        if hint is None or hint is Any:
            raise TypeError(f"operation {name}: argument {p.name!r} needs a concrete type annotation")
        fields[p.name] = (hint, ... if p.default is p.empty else p.default)
    model: type[BaseModel] = create_model(f"{name} arguments", __config__=_CONFIG, **fields)
    return model


def check_arguments(name: str, model: type[BaseModel], args: Any) -> dict[str, Any]:
    """The arguments the caller gave, validated (defaults stay the function's own)."""
    if not isinstance(args, dict):
        raise InvalidArgument(f"{name}: arguments must be a JSON object, not {json_kind(args)}")
    try:
        checked = model.model_validate(args)
    except ValidationError as e:
        raise InvalidArgument(f"{name}: {describe_errors(e, model)}") from None
    return {k: getattr(checked, k) for k in checked.model_fields_set}


__all__ = ["arguments_model", "check_arguments"]
