"""Strict, typed YAML <-> nested keyword-only dataclasses (STYLE.md §3), validated by pydantic v2.

A config is a tree of dataclasses (plain or pydantic ones); YAML is only its serialisation. The
fields' annotations say everything about a key: its type, its choices (``Literal``) and its range
(``Annotated[float, Field(ge=0)]``), in one place. Loading is strict (pydantic's strict mode on
the parsed YAML, see `data_store.schema.validate`): an unknown key is an error that names the
dotted key path and the keys allowed there, and every value is checked against its field's
annotation:

- ``bool`` accepts only true/false (never 0/1); ``int`` refuses bools; ``float`` accepts ints;
  no float is NaN or infinite (`data_store.schema.STRICT`).
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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from data_store import schema
from data_store.errors import InputError
from data_store.schema import init_fields, is_dataclass_type, members, unwrap

__all__ = [
    "apply_overrides",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load_yaml",
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
# Validation: `data_store.schema` (pydantic v2, strict; shared with the store's records)


def _admits_str(tp: Any) -> bool:
    return any(a is str or a is Path for a in members(tp))


def _init_dict(cfg: Any) -> Any:
    """`to_dict` of the settable fields only: what `from_dict` takes back."""
    if is_dataclass_type(type(cfg)):
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
    if not is_dataclass_type(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    return schema.validate(cls, {} if data is None else data, f"{where}." if where else "")


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
        raise err.moved(path=str(path)) from None


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
        if not is_dataclass_type(base):
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
            cfg = schema.validate(cls, _with(cfg, parts, value))
        except InputError as err:
            if not _admits_str(tp) or value == text:
                raise InputError(f"{label}: {err}") from None
            cfg = schema.validate(
                cls, _with(cfg, parts, text)
            )  # e.g. model.name=123 for a str field
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
        cfg = schema.validate(cls, _with(cfg, parts, value), where)
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
