"""Strict typed YAML configs: unknown keys, types, overrides, round trips, flattening."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from data_store.errors import InputError
from tsesnet.common.yaml_config import (
    apply_overrides,
    dump_yaml,
    flatten,
    from_dict,
    load_yaml,
    to_dict,
)
from tsesnet.losses import LossConfig


@dataclass(kw_only=True)
class ModelSection:
    preset: Literal["tiny", "small", "paper"] = "tiny"
    fusion: str = "tsff"
    channels: tuple[int, ...] = (8, 16)
    tumor_aware: bool = True

    def __post_init__(self):
        if len(self.channels) < 2:
            raise ValueError(f"channels needs >= 2 levels, got {self.channels}")


@dataclass(kw_only=True)
class DataSection:
    patch: tuple[int, int, int] = (48, 96, 96)
    fg_fraction: float = 1 / 3
    cases: list[str] = field(default_factory=list)
    cache: Optional[int] = None  # noqa: UP045 - the typing spelling must work too
    root: Path | None = None


@dataclass(kw_only=True)
class Root:
    name: str = "run"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossConfig = field(default_factory=LossConfig)
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class NeedsSeed:
    seed: int


def test_from_dict_builds_nested_typed_config():
    cfg = from_dict(
        Root,
        {
            "model": {"preset": "small", "channels": [4, 8, 16]},
            "data": {"patch": [32, 64, 64], "cases": ["a", "b"], "cache": None, "root": "/x"},
            "loss": {"alpha": 1, "tau": 1e-5},
            "extra": {"w": 2},
        },
    )
    assert cfg.model.preset == "small" and cfg.model.channels == (4, 8, 16)
    assert cfg.data.patch == (32, 64, 64) and cfg.data.root == Path("/x")
    assert cfg.loss.alpha == 1.0 and isinstance(cfg.loss.alpha, float)
    assert cfg.extra == {"w": 2.0}
    assert from_dict(Root, None) == Root()


@pytest.mark.parametrize(
    "data,message",
    [
        ({"loss": {"alpah": 0.5}}, "unknown key loss.alpah; allowed keys in loss: alpha, beta"),
        ({"modle": {}}, "unknown key modle; allowed keys at the top level: name, model"),
        ({"loss": {"alpha": "high"}}, "loss.alpha: expected float, got str 'high'"),
        ({"loss": {"samples_per_class": 2.5}}, "loss.samples_per_class: expected int"),
        ({"loss": {"samples_per_class": True}}, "expected int, got bool"),
        ({"model": {"tumor_aware": 1}}, "model.tumor_aware: expected bool, got int"),
        ({"model": {"preset": "huge"}}, "model.preset: expected one of 'tiny', 'small'"),
        ({"data": {"patch": [32, 64]}}, "data.patch: expected 3 items"),
        ({"data": {"patch": [32, 64, "x"]}}, "data.patch[2]: expected int"),
        ({"data": {"cache": "big"}}, "data.cache: expected int | null"),
        ({"data": 5}, "data: expected a mapping of DataSection fields"),
        ({"model": {"channels": [8]}}, "model.channels needs >= 2 levels"),
        ({"extra": {"w": "x"}}, "extra.w: expected float"),
    ],
)
def test_from_dict_errors_name_the_key_path(data, message):
    with pytest.raises(InputError) as err:
        from_dict(Root, data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_required_key():
    with pytest.raises(InputError, match="missing key seed"):
        from_dict(NeedsSeed, {})


def test_load_yaml_reads_paper_floats_and_names_the_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("loss:\n  tau: 1e-5\n  beta: .5\ndata:\n  patch: [16, 32, 32]\n")
    cfg = load_yaml(Root, good)
    assert cfg.loss.tau == 1e-5 and cfg.loss.beta == 0.5 and cfg.data.patch == (16, 32, 32)
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  gamma: 2\n")
    with pytest.raises(InputError, match=rf"^{bad}: unknown key loss.gamma"):
        load_yaml(Root, bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: [1, 2\n")
    with pytest.raises(InputError, match=rf"^{broken}: invalid YAML at line 2"):
        load_yaml(Root, broken)
    with pytest.raises(InputError, match="config file not found"):
        load_yaml(Root, tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(Root, empty) == Root()


def test_apply_overrides_typed_and_pure():
    base = Root()
    cfg = apply_overrides(
        base,
        [
            "loss.alpha=0.5",
            "model.fusion=cnn",
            "data.patch=[32,64,64]",
            "loss.tau=1e-4",
            "model.tumor_aware=false",
            "data.cache=null",
            "name=123",  # a str field takes the raw text
            "extra={a: 1}",
        ],
    )
    assert cfg.loss.alpha == 0.5 and cfg.model.fusion == "cnn" and cfg.data.patch == (32, 64, 64)
    assert cfg.loss.tau == 1e-4 and cfg.model.tumor_aware is False and cfg.data.cache is None
    assert cfg.name == "123" and cfg.extra == {"a": 1.0}
    assert base == Root()  # untouched


@pytest.mark.parametrize(
    "item,message",
    [
        ("loss.gamma=1", "unknown key loss.gamma; allowed keys in loss: alpha"),
        ("los.alpha=1", "unknown key los; allowed keys at the top level"),
        ("loss.alpha=abc", "loss.alpha: expected float, got str 'abc'"),
        ("data.patch=[1,2]", "data.patch: expected 3 items"),
        ("model.tumor_aware=1", "model.tumor_aware: expected bool, got int"),
        ("loss.alpha", "is not key=value"),
        ("loss.alpha.x=1", "loss.alpha is a value, not a section"),
        ("model.channels=[4]", "model.channels needs >= 2 levels"),
    ],
)
def test_apply_overrides_errors(item, message):
    with pytest.raises(InputError) as err:
        apply_overrides(Root(), [item])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_yaml_round_trip_and_flatten(tmp_path):
    cfg = apply_overrides(Root(), ["data.patch=[16,32,32]", "data.root=/tmp/x", "loss.tau=1e-5"])
    text = dump_yaml(cfg)
    assert "patch: [16, 32, 32]" in text
    (tmp_path / "c.yaml").write_text(text)
    assert load_yaml(Root, tmp_path / "c.yaml") == cfg
    d = to_dict(cfg)
    assert d["data"]["patch"] == [16, 32, 32] and d["data"]["root"] == "/tmp/x"
    flat = flatten(cfg)
    assert flat["loss.alpha"] == 0.7 and flat["loss.samples_per_class"] == 256
    assert flat["data.patch"] == "[16, 32, 32]" and flat["data.cache"] == "null"
    assert flat["model.tumor_aware"] is True and flat["extra"] == "{}"
    assert flatten(d) == flat
    assert all(isinstance(v, (str, int, float)) for v in flat.values())


# ------------------------------------------------------------------ configs read safely

TSESNET = str(Path(sys.executable).parent / "tsesnet")

# 9 levels of 9 references each, inside a valid key: 9**9 (387 million) strings once expanded,
# from < 500 bytes.
BOMB = (
    "loss:\n  alpha: ["
    + ", ".join(
        f"&l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]"
        for i in range(9)
    )
    + "]\n"
)


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run(
        [TSESNET, *argv], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (BOMB, r"invalid YAML at line 2, column \d+: aliases \(\*l0\) are not allowed in configs"),
        ("name: &x a\nmodel:\n  fusion: *x\n", r"invalid YAML at line 3, column 11: aliases"),
        ("loss: " + "[" * 5000 + "]" * 5000 + "\n", r"invalid YAML at line 1, column 38: nested"),
        (
            "loss: " + "{a: " * 200 + "1" + "}" * 200 + "\n",
            r"invalid YAML .*: nested deeper than 32",
        ),
        (
            "loss:\n  alpha: 0.5\nname: x\nloss:\n  beta: 0.5\n",
            r"invalid YAML at line 4, column 1: duplicate key 'loss' \(first at line 1\)",
        ),
        (
            "loss:\n  alpha: 0.5\n  beta: 1\n  alpha: 0.7\n",
            r"invalid YAML at line 4, column 3: duplicate key 'alpha' \(first at line 2",
        ),
    ],
    ids=["alias bomb", "alias", "deep lists", "deep mappings", "duplicate", "nested duplicate"],
)
def test_unsafe_yaml_is_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    start = time.monotonic()
    with pytest.raises(InputError) as info:
        load_yaml(Root, path)
    assert time.monotonic() - start < 5
    assert re.match(rf"^{path}: {message}", str(info.value)), str(info.value)
    assert "\n" not in str(info.value)


def test_unsafe_override_values_are_refused():
    with pytest.raises(InputError, match=r"^override 'extra={a: 1, a: 2}': duplicate key 'a'"):
        apply_overrides(Root(), ["extra={a: 1, a: 2}"])
    assert apply_overrides(Root(), ["name=*x"]).name == "*x"  # a str field takes the text
    with pytest.raises(InputError, match=r"aliases \(\*x\) are not allowed"):
        apply_overrides(Root(), ["data.cases=[&x a, *x]"])


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_cli_refuses_unsafe_config_before_ray_starts(tmp_path, command):
    """`tsesnet train|sweep --config FILE`: one line, exit 2, seconds, no Ray started (the
    store does not even exist: the config is read first)."""
    cases = {
        "bomb.yaml": (BOMB, "aliases (*l0) are not allowed in configs"),
        "deep.yaml": ("run: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper than 32"),
        "dup.yaml": ("optim:\n  lr: 0.001\noptim:\n  lr: 0.1\n", "duplicate key 'optim'"),
    }
    for name, (text, words) in cases.items():
        (tmp_path / name).write_text(text)
        start = time.monotonic()
        proc = _run(
            command, "--store", str(tmp_path / "none.zarr"), "--config", str(tmp_path / name)
        )
        assert time.monotonic() - start < 30, name
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: {tmp_path / name}: invalid YAML at line ") and words in line
        assert "Ray" not in proc.stdout + proc.stderr
