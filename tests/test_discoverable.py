"""Settings a user can discover from the command line: `tsesnet config keys` lists every
training-config key (type, default, range, help) from the config classes themselves, every
option of every command has a `--help` line, and `model-summary --patch` counts at the patch the
model is trained at."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

from tsesnet.cli import build_parser
from tsesnet.training.config import RANGES, TrainConfig, load_config


def _tsesnet(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tsesnet.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _all_keys() -> dict[str, object]:
    cfg = TrainConfig()
    return {
        f"{s.name}.{f.name}": getattr(getattr(cfg, s.name), f.name)
        for s in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, s.name))
    }


def test_config_keys_lists_every_key_with_type_default_range_and_help():
    proc = _tsesnet("config", "keys", "--json")
    assert proc.returncode == 0, proc.stderr
    keys = {k["key"]: k for k in json.loads(proc.stdout)}
    defaults = _all_keys()
    assert list(keys) == list(defaults)  # every key, in the sections' order
    for key, value in defaults.items():
        k = keys[key]
        assert k["default"] == (list(value) if isinstance(value, tuple) else value), key
        assert k["help"], f"{key} has no help: add it to its class's Attributes: docstring"
        assert k["range"] == RANGES.get(key, k["range"]), key
        # What the table says can be set, can be set: `--set KEY=DEFAULT` loads.
        shown = json.dumps(k["default"]) if not isinstance(k["default"], str) else k["default"]
        load_config(overrides=[f"{key}={shown}"])
    assert keys["optim.lr_decay"]["range"] == "none | poly"
    assert (
        keys["data.val_overlap"]["range"] == "[0, 1)"
        and keys["data.val_overlap"]["type"] == "float"
    )
    assert keys["model.tumor_aware"]["range"] == "true | false"

    table = _tsesnet("config", "keys").stdout.splitlines()
    line = next(ln for ln in table if ln.startswith("data.patch "))
    assert "tuple[int, int, int]" in line and "[48, 96, 96]" in line and "[1, inf)" in line
    assert "patch size (z, y, x) in voxels" in line


def _options(parser: argparse.ArgumentParser, name: str = "tsesnet"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _options(p, f"{name} {sub}")
        elif not isinstance(action, argparse._HelpAction):
            yield name, action


def test_every_option_of_every_command_is_described():
    missing = [
        f"{cmd} {'/'.join(a.option_strings) or a.dest}"
        for cmd, a in _options(build_parser())
        if not a.help
    ]
    assert missing == []
    text = " ".join(_tsesnet("train", "--help").stdout.split())  # unwrapped
    assert "override one config key" in text and "tsesnet config keys" in text


@pytest.mark.parametrize(
    ("patch", "params"),
    [(None, 661249), (["16", "32", "32"], 661249), (["8", "16", "16"], 416513)],
)
def test_model_summary_counts_at_the_given_patch(patch, params):
    argv = ["model-summary", "--preset", "tiny", "--json"]
    proc = _tsesnet(*argv, *(["--patch", *patch] if patch else []))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["patch"] == [int(p) for p in patch or (16, 32, 32)]
    assert out["params"] == params  # the TA modules are fitted to the patch


def test_model_summary_refuses_a_patch_the_network_cannot_take():
    proc = _tsesnet("model-summary", "--preset", "tiny", "--patch", "15", "32", "32")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "not a multiple of 8" in proc.stderr
