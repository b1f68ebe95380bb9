"""`tsesnet model-summary`: counts that match the model, and the paper preset's size (Table 2)."""

from __future__ import annotations

import argparse
import json

import pytest

from tsesnet.model import build_model
from tsesnet.programs.model_summary import PAPER_TABLES, cli, model_summary


def test_tiny_summary_counts_match_the_model():
    s = model_summary("tiny", "tsff", phases=3, patch=(16, 32, 32))
    assert s["params"] == sum(p.numel() for p in build_model("tiny").parameters())
    assert s["flops"] == 2 * s["macs"] > 0
    assert 0 < s["peak_memory_bytes"] < 2**30
    assert "CPU" in s["memory_method"]


def test_macs_grow_with_phases():
    """The shared encoder runs on every phase, the decoder once."""
    m3 = model_summary("tiny", "meanpool", phases=3, memory=False)["macs"]
    m6 = model_summary("tiny", "meanpool", phases=6, memory=False)["macs"]
    assert 1.5 < m6 / m3 < 2.0  # encoder doubles, decoder does not


def test_paper_preset_reproduces_table_2_within_ten_percent():
    s = model_summary("paper", "tsff")  # meta device: no real tensors, fast on any machine
    params, macs = PAPER_TABLES["tsff"]
    assert s["patch"] == [48, 96, 96] and s["phases"] == 6
    assert abs(s["params"] / params - 1) < 0.10, s["params"]
    assert abs(s["macs"] / macs - 1) < 0.10, s["macs"]
    assert s["paper_params"] == int(params)
    assert s["peak_memory_bytes"] > 2**30


def test_cli_json(capsys):
    args = argparse.Namespace(preset="tiny", fusion="meanpool", phases=2, json=True)
    assert cli(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"params", "macs", "flops", "peak_memory_bytes"} <= set(out)
    assert out["fusion"] == "meanpool" and out["phases"] == 2


def test_cli_table_and_errors(capsys):
    assert cli(argparse.Namespace(preset="tiny", fusion="tsff", phases=2, json=False)) == 0
    assert "| tsff |" in capsys.readouterr().out
    assert cli(argparse.Namespace(preset="tiny", fusion="gru", phases=2, json=False)) == 2
    assert "unknown fusion" in capsys.readouterr().err


def test_summary_rejects_bad_patch():
    with pytest.raises(ValueError, match="multiple of"):
        model_summary("tiny", patch=(15, 32, 32))


def test_meta_memory_estimate_equals_the_cpu_measurement():
    """The paper-size estimate (meta device) tracks the same bytes a real CPU step allocates."""
    import torch

    from tsesnet.programs.model_summary import step_peak_bytes

    torch.manual_seed(0)
    cpu = step_peak_bytes(build_model("tiny"), torch.randn(1, 3, 16, 32, 32))
    with torch.device("meta"):
        model, x = build_model("tiny"), torch.empty(1, 3, 16, 32, 32)
    assert step_peak_bytes(model, x) == cpu
