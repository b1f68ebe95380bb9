"""Validation of settings and records by pydantic v2, with one-line errors naming the key.

A config or record is a dataclass (plain or pydantic) whose field annotations say everything
about a key: its type, its choices (``Literal``) and its range (``Annotated[float,
Field(ge=0)]``), in one place. `validate` checks parsed YAML or JSON against it in pydantic's
strict mode and turns pydantic's first error into one line a user can act on:
``loss.alpha: expected float, got str 'high'``, ``unknown key loss.gamma; allowed keys in loss:
alpha, beta, ...``, ``data.fg_fraction=5 is out of range; it must be in [0, 1]``.

The training and sweep configs (`tsesnet.common.yaml_config`) and the store's index entries and
integrity records (`data_store.index`, `data_store.integrity`) use it; it lives here because
`data_store` never imports `tsesnet`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import annotated_types
import pydantic
import pydantic_core
from pydantic import ConfigDict

from data_store.errors import InputError

__all__ = [
    "STRICT",
    "init_fields",
    "interval",
    "is_dataclass_type",
    "members",
    "type_name",
    "unwrap",
    "validate",
]

T = TypeVar("T")


# What every config shares: an unknown key is an error and a float is finite (NaN and infinities
# are never a setting). Plain dataclasses take it from the wrapper model of `_model`; a pydantic
# dataclass carries its own (`data_store.sampler.SamplerConfig`). A stored record sets its own
# with `pydantic.with_config` (extra="ignore": keys a later release adds are left alone).
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

_EXTRA = {"extra_forbidden", "unexpected_keyword_argument"}
_MISSING = {"missing", "missing_keyword_only_argument", "missing_argument"}
_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
_MAPPING = {"dataclass_type", "dataclass_exact_type", "model_type", "model_attributes_type"}


@functools.cache
def _model(cls: type) -> type[pydantic.BaseModel]:
    """A model with one field, `value`, of type `cls`, under `STRICT`."""
    return pydantic.create_model(f"_{cls.__name__}Root", __config__=STRICT, value=(cls, ...))


def _plain(value: Any) -> Any:
    """JSON fallback: a NumPy scalar (a Ray Tune sample) as its Python value."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not a config value")


def validate(cls: type[T], data: Any, prefix: str = "") -> T:
    """``data`` (parsed YAML or JSON: mappings, lists, scalars) validated into ``cls``.

    The data goes through JSON, so pydantic's strict JSON rules apply: a list is a tuple, a
    string a Path, an int a float, and nothing else converts (no "1" -> 1, no 1 -> true).

    Raises:
        InputError: the first problem, one line, keys written from ``prefix`` on.
    """
    try:
        text = pydantic_core.to_json({"value": data}, inf_nan_mode="constants", fallback=_plain)
        return _model(cls).model_validate_json(text, strict=True).value
    except pydantic_core.PydanticSerializationError as err:
        raise InputError(f"{prefix.rstrip('.') or 'config'}: {err}") from None
    except pydantic.ValidationError as err:
        errors = err.errors(include_url=False)
        first = next((e for e in errors if e["type"] in _EXTRA), errors[0])
        raise InputError(_describe(cls, first, prefix)) from None


def unwrap(tp: Any) -> Any:
    """``tp`` without ``Annotated`` and without ``| None`` when one type is left."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif _is_union(tp) and len([a for a in get_args(tp) if a is not type(None)]) == 1:
            tp = next(a for a in get_args(tp) if a is not type(None))
        else:
            return tp


def is_dataclass_type(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def init_fields(cls: type) -> dict[str, Any]:
    """A dataclass's settable fields -> their annotations (``Annotated`` constraints kept)."""
    hints = get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _walk(cls: type, loc: tuple) -> tuple[list, Any]:
    """The parts of an error location that name keys and items (a union member's tag stops the
    walk), and the annotation there (None past an unknown key)."""
    path: list = []
    tp: Any = cls
    for i, part in enumerate(loc):
        base = unwrap(tp)
        args = get_args(base)
        origin = get_origin(base)
        if is_dataclass_type(base):
            tp = init_fields(base).get(part)
        elif origin is tuple and isinstance(part, int):
            fixed = not (len(args) == 2 and args[1] is Ellipsis)
            tp = (args[part] if part < len(args) else None) if fixed else args[0]
        elif origin is list and isinstance(part, int):
            tp = args[0] if args else Any
        elif origin in (dict, Mapping):
            if loc[i + 1 : i + 2] == ("[key]",):
                return path, (args[0] if args else Any)  # "files: chunk key '../x' is not ..."
            tp = args[1] if args else Any
        else:
            break
        path.append(part)
        if tp is None:
            break
    return path, tp


def _key(path: list, prefix: str = "") -> str:
    """``data.patch[2]`` from ``["data", "patch", 2]``, after ``prefix`` ("" or "space.")."""
    text = prefix
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f"{'.' if text and not text.endswith('.') else ''}{part}"
    return text


def _number(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() and math.isfinite(x) else str(x)


def interval(tp: Any) -> str | None:
    """The range the constraints of annotation ``tp`` allow, as an interval ("[0, 1)"), of each
    item for a tuple; None when it has no constraint."""
    base = unwrap(tp)
    if get_origin(base) is tuple and get_args(base):
        return interval(get_args(base)[0])
    lo, hi, constrained = "(-inf", "inf)", False
    while True:
        if get_origin(tp) is Annotated:
            for meta in get_args(tp)[1:]:
                for m in getattr(meta, "metadata", [meta]):
                    constrained = True
                    if isinstance(m, annotated_types.Ge):
                        lo = f"[{_number(m.ge)}"
                    elif isinstance(m, annotated_types.Gt):
                        lo = f"({_number(m.gt)}"
                    elif isinstance(m, annotated_types.Le):
                        hi = f"{_number(m.le)}]"
                    elif isinstance(m, annotated_types.Lt):
                        hi = f"{_number(m.lt)})"
            tp = get_args(tp)[0]
        elif _is_union(tp) and len([a for a in get_args(tp) if a is not type(None)]) == 1:
            tp = next(a for a in get_args(tp) if a is not type(None))
        else:
            break
    return f"{lo}, {hi}" if constrained else None


def _describe(cls: type, error: dict, prefix: str) -> str:
    """One line for a pydantic error: the dotted key, what it expects, what it got."""
    loc = error["loc"][1:]  # without the wrapper's `value`
    path, tp = _walk(cls, loc)
    key = _key(path, prefix).rstrip(".")
    label = key or "config"
    kind, value = error["type"], error.get("input")
    if kind in _EXTRA:
        parent = _key(path[:-1], prefix).rstrip(".")
        allowed = ", ".join(init_fields(unwrap(_walk(cls, loc[:-1])[1])))
        return (
            f"unknown key {key}; allowed keys {'in ' + parent if parent else 'at the top level'}: "
            f"{allowed}"
        )
    if kind in _MISSING and path and isinstance(path[-1], int):
        seq = _walk(cls, tuple(path[:-1]))[1]
        n = len(get_args(unwrap(seq)))
        got = f"got {len(value)}: {value!r}"
        return f"{_key(path[:-1], prefix)}: expected {n} items ({type_name(seq)}), {got}"
    if kind in _MISSING:
        return f"missing key {key} ({type_name(tp)})"
    if kind == "too_long" and get_origin(unwrap(tp)) is tuple:
        n = error["ctx"]["max_length"]
        return f"{label}: expected {n} items ({type_name(tp)}), got {len(value)}: {value!r}"
    if kind == "value_error":
        text = str(error["ctx"]["error"])
        base = unwrap(tp)
        if path and is_dataclass_type(base) and text.split(" ", 1)[0] in init_fields(base):
            return f"{key}.{text}"  # "data.fg_fraction must be ..."
        return f"{key or prefix.rstrip('.') or cls.__name__}: {text}"
    if kind in _RANGE:
        spec = interval(tp)
        where = f"it must be in {spec}" if spec else error["msg"].replace("Input should", "it must")
        return f"{label}={value} is out of range; {where}"
    if kind in _MAPPING:
        name = error.get("ctx", {}).get("class_name") or type_name(tp)
        return f"{label}: expected a mapping of {name} fields, got {_show(value)}"
    if kind == "string_pattern_mismatch":
        return f"{label}: expected a text matching {error['ctx']['pattern']}, got {_show(value)}"
    if kind == "string_too_short":
        return f"{label}: expected a non-empty text, got {_show(value)}"
    if kind == "literal_error":
        choices = next((get_args(a) for a in members(tp) if get_origin(a) is Literal), ())
        allowed = ", ".join(repr(c) for c in choices)
        return f"{label}: expected one of {allowed}, got {_show(value)}"
    if tp is None:
        return f"{label}: {error['msg']}"
    return f"{label}: expected {type_name(tp)}, got {_show(value)}"


def members(tp: Any) -> list:
    tp = unwrap(tp)
    return [unwrap(a) for a in get_args(tp)] if _is_union(tp) else [tp]


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Annotated:
        return type_name(get_args(tp)[0])
    if _is_union(tp):
        return " | ".join(type_name(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return f"Literal[{', '.join(repr(a) for a in get_args(tp))}]"
    args = get_args(tp)
    if isinstance(tp, type) and not args:
        return tp.__name__
    if args:
        origin = get_origin(tp)
        items = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', origin)}[{items}]"
    return str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)
