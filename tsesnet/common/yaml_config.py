"""Strict, typed YAML <-> nested keyword-only dataclasses (STYLE.md §3), validated by pydantic v2.

A config is a tree of dataclasses (plain or pydantic ones); YAML is only its serialisation. The
fields' annotations say everything about a key: its type, its choices (``Literal``) and its range
(``Annotated[float, Field(ge=0)]``), in one place. Loading is strict (pydantic's strict mode on
the parsed YAML, see `_validate`): an unknown key is an error that names the dotted key path and
the keys allowed there, and every value is checked against its field's annotation:

- ``bool`` accepts only true/false (never 0/1); ``int`` refuses bools; ``float`` accepts ints;
  no float is NaN or infinite (`STRICT`).
- ``tuple[int, int, int]`` (fixed length), ``tuple[int, ...]``, ``list[X]`` and ``dict[K, V]``
  accept YAML sequences / mappings and convert their items.
- ``X | None`` / ``Optional[X]``, ``Literal[...]``, ``Path`` (from a string), nested dataclasses
  (from a mapping), ``Any``.

YAML is read with PyYAML's safe loader, corrected to YAML 1.2 floats: plain PyYAML reads the
paper's ``tau: 1e-5`` as the string "1e-5". It refuses aliases, nesting deeper than `MAX_DEPTH`
and a key given twice in one mapping, each as one line with the line and column.

Errors are ``data_store.errors.InputError`` (a ValueError), one line, so the CLI prints them as
they are: ``FILE: loss.alpha: expected float, got str 'high'``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import annotated_types
import pydantic
import pydantic_core
import yaml
from pydantic import ConfigDict

from data_store.errors import InputError

__all__ = [
    "apply_overrides",
    "dump_yaml",
    "flatten",
    "from_dict",
    "init_fields",
    "interval",
    "load_yaml",
    "unwrap",
    "validate",
    "to_dict",
    "with_values",
]

T = TypeVar("T")


MAX_DEPTH = 32


class UnsafeYAMLError(yaml.MarkedYAMLError):
    """YAML that `_Loader` refuses to read (an alias, too deep, a duplicate key)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader whose floats follow YAML 1.2 (``1e-5`` is a float, not a string), and which
    reads only what a config needs: no aliases (a "billion laughs" of a few hundred bytes expands
    to hundreds of millions of items), at most `MAX_DEPTH` levels of nesting (deeper ones would
    end in a RecursionError), and no key twice in one mapping (PyYAML keeps the last silently).
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise UnsafeYAMLError(
                None,
                None,
                f"aliases (*{event.anchor}) are not allowed in configs; write the value out",
                event.start_mark,
            )
        if self._depth >= MAX_DEPTH:
            raise UnsafeYAMLError(
                None,
                None,
                f"nested deeper than {MAX_DEPTH} levels",
                self.peek_event().start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if seen is not key_node.start_mark:
                    raise UnsafeYAMLError(
                        None,
                        None,
                        f"duplicate key {key!r} (first at line {seen.line + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


# Fresh resolver lists, so that adding one does not change yaml.SafeLoader itself.
_Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] != "tag:yaml.org,2002:float"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ---------------------------------------------------------------------------------------------
# Validation: pydantic v2, strict

# What every config shares: an unknown key is an error and a float is finite (NaN and infinities
# are never a setting). Plain dataclasses take it from the wrapper model of `_model`; a pydantic
# dataclass carries its own (`data_store.sampler.SamplerConfig`, which cannot import this).
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


def _validate(cls: type[T], data: Any, prefix: str = "") -> T:
    """``data`` (parsed YAML: mappings, lists, scalars) validated into ``cls``.

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


def _is_dataclass_type(tp: Any) -> bool:
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
    for part in loc:
        base = unwrap(tp)
        args = get_args(base)
        origin = get_origin(base)
        if _is_dataclass_type(base):
            tp = init_fields(base).get(part)
        elif origin is tuple and isinstance(part, int):
            fixed = not (len(args) == 2 and args[1] is Ellipsis)
            tp = (args[part] if part < len(args) else None) if fixed else args[0]
        elif origin is list and isinstance(part, int):
            tp = args[0] if args else Any
        elif origin in (dict, Mapping):
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
    key = _key(path, prefix)
    label = key or prefix.rstrip(".") or "config"
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
        return f"{_key(path[:-1], prefix)}: expected {n} items ({_type_name(seq)}), {got}"
    if kind in _MISSING:
        return f"missing key {key} ({_type_name(tp)})"
    if kind == "too_long" and get_origin(unwrap(tp)) is tuple:
        n = error["ctx"]["max_length"]
        return f"{label}: expected {n} items ({_type_name(tp)}), got {len(value)}: {value!r}"
    if kind == "value_error":
        text = str(error["ctx"]["error"])
        base = unwrap(tp)
        if path and _is_dataclass_type(base) and text.split(" ", 1)[0] in init_fields(base):
            return f"{key}.{text}"  # "data.fg_fraction must be ..."
        return f"{key or prefix.rstrip('.') or cls.__name__}: {text}"
    if kind in _RANGE:
        spec = interval(tp)
        where = f"it must be in {spec}" if spec else error["msg"].replace("Input should", "it must")
        return f"{label}={value} is out of range; {where}"
    if kind in _MAPPING:
        name = error.get("ctx", {}).get("class_name") or _type_name(tp)
        return f"{label}: expected a mapping of {name} fields, got {_show(value)}"
    if kind == "literal_error":
        choices = next((get_args(a) for a in _members(tp) if get_origin(a) is Literal), ())
        allowed = ", ".join(repr(c) for c in choices)
        return f"{label}: expected one of {allowed}, got {_show(value)}"
    if tp is None:
        return f"{label}: {error['msg']}"
    return f"{label}: expected {_type_name(tp)}, got {_show(value)}"


def _members(tp: Any) -> list:
    tp = unwrap(tp)
    return [unwrap(a) for a in get_args(tp)] if _is_union(tp) else [tp]


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Annotated:
        return _type_name(get_args(tp)[0])
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return f"Literal[{', '.join(repr(a) for a in get_args(tp))}]"
    args = get_args(tp)
    if isinstance(tp, type) and not args:
        return tp.__name__
    if args:
        origin = get_origin(tp)
        items = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', origin)}[{items}]"
    return str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _admits_str(tp: Any) -> bool:
    return any(a is str or a is Path for a in _members(tp))


def _init_dict(cfg: Any) -> Any:
    """`to_dict` of the settable fields only: what `from_dict` takes back."""
    if _is_dataclass_type(type(cfg)):
        return {f.name: _init_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    return to_dict(cfg)


# ---------------------------------------------------------------------------------------------
# Public API


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly (pydantic, `STRICT`).

    Field annotations may carry constraints (``Annotated[int, Field(ge=1)]``): a value outside
    them is "KEY=VALUE is out of range; it must be in [1, inf)".

    Args:
        cls: a dataclass (its fields may be dataclasses in turn).
        data: the mapping, e.g. parsed YAML; None is an empty mapping.
        where: dotted path of ``data`` inside the root config, for messages.

    Raises:
        InputError: unknown or missing key, a value of the wrong type or out of range, or the
            class's own check failing; one line naming the dotted key path (and, for an
            unknown key, the allowed keys).
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    return _validate(cls, {} if data is None else data, f"{where}." if where else "")


def validate(cfg: T) -> T:
    """``cfg`` (e.g. built or changed in Python) checked as if read from YAML: a fresh copy.

    Raises:
        InputError: as `from_dict`.
    """
    return from_dict(type(cfg), _init_dict(cfg))


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Load dataclass ``cls`` from a YAML file strictly; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError("config file not found", path=str(path)) from None
    except OSError as err:
        raise InputError(f"cannot read config: {err.strerror}", path=str(path)) from None
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise InputError(f"invalid YAML{at}: {problem}", path=str(path)) from None
    try:
        return from_dict(cls, data)
    except InputError as err:
        raise InputError(err.problem, path=str(path)) from None


def _parse_override(item: str) -> tuple[list[str], str]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise InputError(f"override {item!r} is not key=value (e.g. loss.alpha=0.5)")
    return key.split("."), text.strip()


def _field_type(cls: type, parts: list[str], label: str) -> Any:
    """The annotation of the field at dotted path ``parts``; errors start with ``label``."""
    tp: Any = cls
    for i, name in enumerate(parts):
        base, key = unwrap(tp), ".".join(parts[: i + 1])
        if not _is_dataclass_type(base):
            raise InputError(f"{label}: {'.'.join(parts[:i])} is a value, not a section")
        fields = init_fields(base)
        if name not in fields:
            where = ".".join(parts[:i])
            raise InputError(
                f"{label}: unknown key {key}; allowed keys "
                f"{'in ' + where if where else 'at the top level'}: {', '.join(fields)}"
            )
        tp = fields[name]
    return tp


def _with(cfg: T, parts: list[str], value: Any) -> dict:
    data = _init_dict(cfg)
    node = data
    for name in parts[:-1]:
        node = node[name]
    node[parts[-1]] = value
    return data


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Return a copy of ``cfg`` with ``dotted.key=value`` overrides applied, validated.

    Each value is parsed as YAML (``0.5``, ``true``, ``null``, ``[32, 64, 64]``,
    ``{a: 1}`` for a whole section) and checked like the YAML file's; a field that admits a
    string also takes the raw text. ``cfg`` itself is not modified.

    Raises:
        InputError: malformed item, unknown key (naming the allowed keys), wrong type or range.
    """
    cls = type(cfg)
    for item in overrides:
        parts, text = _parse_override(item)
        label = f"override {item!r}"
        tp = _field_type(cls, parts, label)
        try:
            value = _parse_yaml(text) if text else None
        except UnsafeYAMLError as err:
            if not _admits_str(tp):
                raise InputError(f"{label}: {err.problem}") from None
            value = text  # a str field takes the text as it is
        except yaml.YAMLError:
            value = text
        try:
            cfg = _validate(cls, _with(cfg, parts, value))
        except InputError as err:
            if not _admits_str(tp) or value == text:
                raise InputError(f"{label}: {err}") from None
            cfg = _validate(cls, _with(cfg, parts, text))  # e.g. model.name=123 for a str field
    return cfg


def with_values(cfg: T, values: Mapping[str, Any], where: str = "") -> T:
    """Return a copy of ``cfg`` with ``{"dotted.key": value}`` set, each checked like YAML.

    Args:
        where: prefix of the key in messages (e.g. "space." for a sweep's search space).

    Raises:
        InputError: unknown key (naming the allowed keys), a value of the wrong type or out of
            range.
    """
    cls = type(cfg)
    for path, value in values.items():
        parts = path.split(".")
        _field_type(cls, parts, f"{where}{path}")
        cfg = _validate(cls, _with(cfg, parts, value), where)
    return cfg


def to_dict(cfg: Any) -> Any:
    """Plain nested dicts/lists/scalars (tuples -> lists, Path -> str), YAML- and JSON-ready."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


class _Dumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists (``patch: [48, 96, 96]``)."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True)
)


def dump_yaml(cfg: Any) -> str:
    """YAML text of ``cfg`` in field order; ``load_yaml`` of it gives ``cfg`` back."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def flatten(cfg: Any, prefix: str = "") -> dict[str, str | float | int]:
    """Dotted keys -> scalars, e.g. for MLflow params: ``{"loss.alpha": 0.7, ...}``.

    Accepts a dataclass or the dict ``to_dict`` makes. Numbers, bools and strings stay as they
    are; None becomes "null" and sequences their JSON text (``"[48, 96, 96]"``).
    """
    out: dict[str, str | float | int] = {}
    for key, value in to_dict(cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}.") if value else {name: "{}"})
        elif value is None:
            out[name] = "null"
        elif isinstance(value, (str, int, float)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out
