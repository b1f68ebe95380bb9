"""Strict, typed YAML <-> nested keyword-only dataclasses (STYLE.md §3).

A config is a tree of dataclasses; YAML is only its serialisation. Loading is strict: an unknown
key is an error that names the dotted key path and the keys allowed there, and every value is
checked against its field's annotation:

- ``bool`` accepts only true/false (never 0/1); ``int`` refuses bools; ``float`` accepts ints.
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
import json
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from data_store.errors import InputError

__all__ = [
    "apply_overrides",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load_yaml",
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
# Type checking and conversion


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted (tuples, floats...)."""
    label = where or "config"
    if tp is Any or tp is object:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise InputError(f"{label}: expected {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except InputError as err:
                errors.append(err)
        if len(errors) == 1 and not str(errors[0]).startswith(f"{label}: expected"):
            raise errors[0]  # deeper and more precise, e.g. "data.patch[2]: expected int"
        raise InputError(f"{label}: expected {_type_name(tp)}, got {_show(value)}")
    origin = get_origin(tp)
    if origin is Literal:
        for choice in get_args(tp):
            if type(value) is type(choice) and value == choice:
                return value
        allowed = ", ".join(repr(c) for c in get_args(tp))
        raise InputError(f"{label}: expected one of {allowed}, got {_show(value)}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif tp in (tuple, list) or origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            return _convert_sequence(tp, origin or tp, value, label)
    elif tp is dict or origin is dict or origin is Mapping:
        if isinstance(value, Mapping):
            args = get_args(tp) or (Any, Any)
            return {
                _convert(args[0], k, f"{label}.{k}"): _convert(args[1], v, f"{label}.{k}")
                for k, v in value.items()
            }
    else:
        raise TypeError(f"{label}: yaml_config cannot check fields of type {_type_name(tp)}")
    raise InputError(f"{label}: expected {_type_name(tp)}, got {_show(value)}")


def _convert_sequence(tp: Any, origin: type, value: list | tuple, label: str) -> tuple | list:
    args = get_args(tp)
    if origin is list:
        item = args[0] if args else Any
        return [_convert(item, v, f"{label}[{i}]") for i, v in enumerate(value)]
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{label}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise InputError(
            f"{label}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}: {value!r}"
        )
    return tuple(
        _convert(a, v, f"{label}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
    )


def _fields(cls: type) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    return fields, get_type_hints(cls)


def _instantiate(cls: type[T], kwargs: dict, where: str) -> T:
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, InputError):
            raise
        text = str(err)
        first = text.split(" ", 1)[0]
        if where and first in {f.name for f in dataclasses.fields(cls)}:
            raise InputError(f"{where}.{text}") from err  # "data.fg_fraction must be ..."
        raise InputError(f"{where or cls.__name__}: {text}") from err


# ---------------------------------------------------------------------------------------------
# Public API


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly.

    Args:
        cls: a dataclass (its fields may be dataclasses in turn).
        data: the mapping, e.g. parsed YAML; None is an empty mapping.
        where: dotted path of ``data`` inside the root config, for messages.

    Raises:
        InputError: unknown or missing key, or a value of the wrong type; the message names the
            dotted key path (and, for an unknown key, the allowed keys).
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(
            f"{where or 'config'}: expected a mapping of {cls.__name__} fields, got {_show(data)}"
        )
    fields, hints = _fields(cls)
    prefix = f"{where}." if where else ""
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise InputError(
                f"unknown key {prefix}{key!s}; allowed keys "
                f"{'in ' + where if where else 'at the top level'}: {', '.join(fields)}"
            )
        kwargs[key] = _convert(hints[key], value, f"{prefix}{key}")
    for name, f in fields.items():
        if name not in kwargs and (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ):
            raise InputError(f"missing key {prefix}{name} ({_type_name(hints[name])})")
    return _instantiate(cls, kwargs, where)


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


def _admits_str(tp: Any) -> bool:
    if tp is str or tp is Path:
        return True
    return _is_union(tp) and any(_admits_str(a) for a in get_args(tp))


def _text_value(tp: Any, text: str, key: str, item: str) -> Any:
    """An override's text parsed as YAML and checked against `tp` (str fields take it raw)."""
    try:
        value = _parse_yaml(text) if text else None
    except UnsafeYAMLError as err:
        if not _admits_str(tp):
            raise InputError(f"{item}: {err.problem}") from None
        value = text  # a str field takes the text as it is
    except yaml.YAMLError:
        value = text
    try:
        return _convert(tp, value, key)
    except InputError as err:
        if not _admits_str(tp):
            raise InputError(f"{item}: {err}") from None
        return _convert(tp, text, key)  # e.g. model.name=123 for a str field


def _replace(obj: Any, parts: list[str], leaf, done: list[str], item: str) -> Any:
    """A copy of dataclass `obj` with the field at path `parts` set to `leaf(type, key)`;
    errors start with `item` (what the user wrote)."""
    cls = type(obj)
    fields, hints = _fields(cls)
    where = ".".join(done)
    name = parts[0]
    key = ".".join([*done, name])
    if name not in fields:
        raise InputError(
            f"{item}: unknown key {key}; allowed keys "
            f"{'in ' + where if where else 'at the top level'}: {', '.join(fields)}"
        )
    if len(parts) > 1:
        child = getattr(obj, name)
        if not dataclasses.is_dataclass(child):
            raise InputError(f"{item}: {key} is a value, not a section")
        new = _replace(child, parts[1:], leaf, [*done, name], item)
    else:
        new = leaf(hints[name], key)
    kwargs = {f: getattr(obj, f) for f in fields}
    kwargs[name] = new
    return _instantiate(cls, kwargs, where)


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Return a copy of ``cfg`` with ``dotted.key=value`` overrides applied, type-checked.

    Each value is parsed as YAML (``0.5``, ``true``, ``null``, ``[32, 64, 64]``,
    ``{a: 1}`` for a whole section) and checked against the field's annotation; a field that
    admits a string also takes the raw text. ``cfg`` itself is not modified.

    Raises:
        InputError: malformed item, unknown key (naming the allowed keys) or wrong type.
    """
    for item in overrides:
        parts, text = _parse_override(item)
        label = f"override {item!r}"
        cfg = _replace(
            cfg, parts, lambda tp, key, t=text, i=label: _text_value(tp, t, key, i), [], label
        )
    return cfg


def with_values(cfg: T, values: Mapping[str, Any], where: str = "") -> T:
    """Return a copy of ``cfg`` with ``{"dotted.key": value}`` set, each checked like YAML.

    Args:
        where: prefix of the key in messages (e.g. "space." for a sweep's search space).

    Raises:
        InputError: unknown key (naming the allowed keys) or a value of the wrong type.
    """
    for path, value in values.items():
        leaf = lambda tp, key, v=value: _convert(tp, v, key)  # noqa: E731
        cfg = _replace(cfg, path.split("."), leaf, [], f"{where}{path}")
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
