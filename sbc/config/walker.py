"""The schema walker: TOML tables -> the frozen dataclasses of ``schema``.

It maps keys to fields by name and converts values by field type (str, int, float, bool,
Literal, X | None, tuple[X, ...], nested dataclasses, classes with a ``parse(str)``
classmethod); a field may name its own parser in its metadata (``field(metadata=rule(parser))``).
Cross-field checks live in an optional ``check()`` method yielding ``(key, reason)``. Every
error names its key path."""

from __future__ import annotations

import dataclasses
import json
import re
import types
from collections.abc import Mapping
from typing import Any, Final, Literal, Union, get_args, get_origin, get_type_hints

from sbc.config.values import (
    Invalid,
    _Ctx,
    _is_int,
    _show,
)

# --- the walker --------------------------------------------------------------------------------

_FAILED: Final = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: str, key: str) -> str:
    key = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{key}" if path else key


def _describe(tp: Any) -> str:
    noun = getattr(tp, "noun", None)
    if isinstance(noun, str):
        return noun
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", bool: "true or false", int: "an integer", float: "a number"}.get(
        tp, str(tp)
    )


def _convert(tp: Any, raw: object, path: str, ctx: _Ctx) -> object:
    """Convert by type; errors go to ``ctx``, returning ``_FAILED``."""
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"config walker cannot handle type {tp!r}")
        return _convert(rest[0], raw, path, ctx)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type) and not hasattr(tp, "parse"):
        return _build(tp, raw, path, ctx)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(raw, list):
            each = _describe(args[0])
            ctx.error(path, f"must be an array, each item {each}, got {_show(raw)}")
            return _FAILED
        items = [_convert(args[0], item, f"{path}[{i}]", ctx) for i, item in enumerate(raw)]
        return _FAILED if any(item is _FAILED for item in items) else tuple(items)
    try:
        return _scalar(tp, raw)
    except Invalid as exc:
        ctx.error(path, exc.reason)
        return _FAILED


def _scalar(tp: Any, raw: object) -> object:
    if get_origin(tp) is Literal:
        if raw in get_args(tp) and type(raw) in {type(a) for a in get_args(tp)}:
            return raw
        allowed = ", ".join(_show(a) for a in get_args(tp))
        raise Invalid(f"must be one of {allowed}, got {_show(raw)}")
    if tp is bool:
        if isinstance(raw, bool):
            return raw
    elif tp is int:
        if _is_int(raw):
            return raw
    elif tp is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
    elif tp is str:
        if isinstance(raw, str):
            return raw
    elif callable(getattr(tp, "parse", None)):
        if isinstance(raw, str):
            try:
                return tp.parse(raw)
            except ValueError as exc:
                raise Invalid(f"{exc}, got {_show(raw)}") from None
    else:
        raise TypeError(f"config walker cannot handle type {tp!r}")
    raise Invalid(f"must be {_describe(tp)}, got {_show(raw)}")


def _build(cls: type[Any], raw: object, path: str, ctx: _Ctx) -> object:
    """Build dataclass ``cls`` from a TOML table, then run its ``check()``."""
    if not isinstance(raw, Mapping):
        ctx.error(path, f"must be a table, got {_show(raw)}")
        return _FAILED
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    for key in raw:
        if key not in names:
            ctx.error(_join(path, str(key)), f"unknown key; allowed: {', '.join(names)}")
    hints = get_type_hints(cls)
    values: dict[str, object] = {}
    ok = True
    for f in fields:
        key_path = _join(path, f.name)
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                ctx.error(key_path, "required key is missing")
                ok = False
            continue
        parser = f.metadata.get("parse")
        if parser is not None:
            try:
                value = parser(raw[f.name], ctx)
            except Invalid as exc:
                ctx.error(key_path, exc.reason)
                value = _FAILED
        else:
            value = _convert(hints[f.name], raw[f.name], key_path, ctx)
        if value is _FAILED:
            ok = False
        else:
            values[f.name] = value
    if not ok:
        return _FAILED
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        for key, reason in check():
            ctx.error(f"{path}.{key}" if path else key, reason)
    return obj
