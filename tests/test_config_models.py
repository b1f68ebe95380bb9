"""The config models (pydantic v2): every shipped config loads as it did before the move, and a
setting's range is written once, as a field constraint, and shows the same everywhere.

Every shipped config (the training recipes and the sweep configs under `CONFIG_DIR`, wherever
that points) loads to exactly the values, value types and run-name hash it had before the config
system moved to pydantic (`tests/config_presets.json`, written by the code before the move)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_store.errors import InputError
from data_store.sampler import SamplerConfig
from sweeps import space
from tsesnet.common.yaml_config import to_dict
from tsesnet.training.config import (
    CONFIG_DIR,
    RANGES,
    TrainConfig,
    check_config,
    config_hash,
    load_config,
)
from tsesnet.training.config_keys import config_keys

EXPECTED = json.loads((Path(__file__).parent / "config_presets.json").read_text())
PRESETS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def _text(value) -> str:
    """JSON text, so that 0.7 and 1 differ from "0.7" and 1.0 (types are part of the value)."""
    return json.dumps(value, sort_keys=True)


def test_every_shipped_config_is_known():
    assert PRESETS, f"no configs found under CONFIG_DIR={CONFIG_DIR}"
    assert set(PRESETS) == set(EXPECTED) - {"(defaults)"}, "add a new config's values here"


@pytest.mark.parametrize("name", PRESETS)
def test_shipped_config_loads_as_before(name):
    expected = EXPECTED[name]
    path = CONFIG_DIR / name
    if "sweep" in expected:
        cfg = to_dict(space.load(path))
        cfg.pop("source")
        assert _text(cfg) == _text(expected["sweep"])
    else:
        cfg = load_config(path)
        assert _text(to_dict(cfg)) == _text(expected["train"])
        assert config_hash(cfg) == expected["hash"]  # default run names unchanged


def test_defaults_as_before():
    cfg = load_config()
    assert _text(to_dict(cfg)) == _text(EXPECTED["(defaults)"]["train"])
    assert config_hash(cfg) == EXPECTED["(defaults)"]["hash"]


def _outside(spec: str) -> float:
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    if lo != float("-inf"):
        return lo - 1 if spec[0] == "[" else lo
    return hi + 1 if spec[-1] == "]" else hi


@pytest.mark.parametrize("key", [k for k, spec in RANGES.items() if "-inf, inf" not in spec])
def test_a_range_is_written_once_and_reads_the_same_everywhere(key):
    """An out-of-range value of any key, whichever component owns it (the sampler's `data`, the
    core's `loss`), is one message form with the interval `tsesnet config keys` shows."""
    spec = {k.key: k.range for k in config_keys()}[key]
    assert spec == RANGES[key]
    default = dict(config_keys_defaults())[key]
    value = _outside(spec)
    if "int" in {k.key: k.type for k in config_keys()}[key]:
        value = int(value)
    if isinstance(default, list):
        text = f"[{', '.join(map(str, [value, *default[1:]] if default else [value]))}]"
    else:
        text = str(value)
    with pytest.raises(InputError) as err:
        load_config(overrides=[f"{key}={text}"])
    assert f"is out of range; it must be in {spec}" in str(err.value), str(err.value)
    assert key in str(err.value) and "\n" not in str(err.value)


def config_keys_defaults():
    return [(k.key, k.default) for k in config_keys()]


def test_a_config_built_in_python_is_checked_like_a_file():
    cfg = TrainConfig()
    cfg.model.tumor_aware = 1  # a type the YAML reader refuses
    with pytest.raises(InputError, match=r"^bad config: model.tumor_aware: expected bool"):
        check_config(cfg)
    with pytest.raises(ValueError, match="fg_fraction"):
        SamplerConfig(fg_fraction=2.0)  # the sampler checks its own fields, the same constraint
