"""`tsesnet config keys`: every training-config key with its type, default, range and help.

Generated from the config classes themselves (`tsesnet.training.config.TrainConfig` and its
sections), so it cannot drift from what `--config FILE` and `--set KEY=VALUE` accept: the types
from the dataclass fields, the defaults from `TrainConfig()` (the recommended recipe), the ranges
from `RANGES` (numbers), the choices of `Literal` fields, and the help from the `Attributes:`
section of each class's docstring (its first sentence).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import typing
from dataclasses import dataclass

from tsesnet.training.config import RANGES, TrainConfig


@dataclass(frozen=True)
class ConfigKey:
    """One `section.name` key of `TrainConfig`."""

    key: str
    type: str
    default: object
    range: str
    help: str


def _attribute_help(cls) -> dict[str, str]:
    """name -> its description, from the `Attributes:` sections of `cls` and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's text wins
        doc = inspect.getdoc(klass) or ""
        if "Attributes:" not in doc:
            continue
        block = doc.split("Attributes:", 1)[1]
        entries: dict[str, list[str]] = {}
        current = None
        for line in block.splitlines():
            m = re.match(r"^    (\w+)(?: \([^)]*\))?: (.*)$", line)
            if m:
                current = m.group(1)
                entries[current] = [m.group(2)]
            elif current and line.startswith("        "):
                entries[current].append(line.strip())
            elif line.strip() and not line.startswith(" "):
                break  # the next section
        out.update({k: " ".join(v) for k, v in entries.items()})
    return out


def _first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (not the one of "Eq. 8")."""
    m = re.match(r"(.+?)\.(\s+[A-Z(`\"]|$)", text)
    return m.group(1) if m else text


def _type_text(tp) -> str:
    """`int`, `float`, `tuple[int, int, int]`, `str | None`... as a user writes it in YAML."""
    if typing.get_origin(tp) is typing.Literal:
        return "str"
    text = str(tp) if not isinstance(tp, type) else tp.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def _range_text(key: str, tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if tp is bool:
        return "true | false"
    return RANGES.get(key, "")


def config_keys() -> list[ConfigKey]:
    """Every key of `TrainConfig`, in the order of its sections and fields."""
    root = TrainConfig()
    keys = []
    for section in dataclasses.fields(TrainConfig):
        part = getattr(root, section.name)
        hints = typing.get_type_hints(type(part))
        docs = _attribute_help(type(part))
        for f in dataclasses.fields(part):
            if f.name.startswith("_"):
                continue
            key = f"{section.name}.{f.name}"
            value = getattr(part, f.name)
            keys.append(
                ConfigKey(
                    key=key,
                    type=_type_text(hints[f.name]),
                    default=list(value) if isinstance(value, tuple) else value,
                    range=_range_text(key, hints[f.name]),
                    help=_first_sentence(docs.get(f.name, "")),
                )
            )
    return keys


def _show(value) -> str:
    """A default as it is written in YAML."""
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value)


def format_keys(keys: list[ConfigKey]) -> str:
    """A fixed-width table: key, type, default, range, help."""
    rows = [("key", "type", "default", "range", "help")]
    rows += [(k.key, k.type, _show(k.default), k.range, k.help) for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
        for r in rows
    ).rstrip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet config keys` (read by `cli`)."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cli(args) -> int:
    """`tsesnet config keys [--json]`."""
    keys = config_keys()
    if args.json:
        print(json.dumps([dataclasses.asdict(k) for k in keys], indent=1, default=str))
    else:
        print("Training-config keys: set in a YAML file (`train --config FILE`, sections as below)")
        print("or one by one (`train --set KEY=VALUE`); defaults are the recommended recipe.\n")
        print(format_keys(keys))
    return 0
