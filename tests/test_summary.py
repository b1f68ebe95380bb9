"""`tsesnet model-summary`: counts that match the model, and the paper preset's size (Table 2)."""

from __future__ import annotations

import json

import pytest

from tsesnet.cli import build_parser
from tsesnet.model import build_model
from tsesnet.programs.model_summary import PAPER_TABLES, cli, model_summary


def test_tiny_summary_counts_match_the_model():
    """The summary counts the network training builds: TA fitted to the patch."""
    s = model_summary("tiny", "tsff", phases=3, patch=(16, 32, 32))
    fitted = build_model("tiny", ta_patch=(16, 32, 32))
    assert s["params"] == sum(p.numel() for p in fitted.parameters())
    assert s["params"] < sum(p.numel() for p in build_model("tiny").parameters())  # cropped
    assert s["flops"] == 2 * s["macs"] > 0
    assert 0 < s["peak_memory_bytes"] < 2**30
    assert "CPU" in s["memory_method"]


def test_macs_grow_with_phases():
    """The shared encoder runs on every phase, the decoder once."""
    m3 = model_summary("tiny", "meanpool", phases=3, memory=False)["macs"]
    m6 = model_summary("tiny", "meanpool", phases=6, memory=False)["macs"]
    assert 1.5 < m6 / m3 < 2.0  # encoder doubles, decoder does not


def test_paper_preset_reproduces_table_2_within_its_tolerances():
    """±10 % parameters, ±15 % MACs of Table 2, with exact attention at levels 2-4 (+9 G)."""
    s = model_summary("paper", "tsff")  # meta device: no real tensors, fast on any machine
    params, macs = PAPER_TABLES["tsff"]
    assert s["patch"] == [48, 96, 96] and s["phases"] == 6
    assert abs(s["params"] / params - 1) < 0.10, s["params"]
    assert abs(s["macs"] / macs - 1) < 0.15, s["macs"]
    attention = [lv["attention"] for lv in s["levels"]]
    assert attention == ["pooled to 4x8x8"] * 2 + ["exact (shared softmax)"] * 3
    assert s["dead_params"] == 0
    assert s["paper_params"] == int(params)
    assert s["peak_memory_bytes"] > 2**30


def _args(*argv: str):
    """`tsesnet model-summary --preset tiny --phases 2 ARGV...` as the command line parses it."""
    return build_parser().parse_args(["model-summary", "--preset", "tiny", "--phases", "2", *argv])


def test_cli_json(capsys):
    assert cli(_args("--fusion", "meanpool", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"params", "macs", "flops", "peak_memory_bytes"} <= set(out)
    assert out["fusion"] == "meanpool" and out["phases"] == 2


def test_cli_table_and_errors(capsys):
    assert cli(_args("--fusion", "tsff")) == 0
    assert "| tsff |" in capsys.readouterr().out
    assert cli(_args("--fusion", "gru")) == 2
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


def test_dead_parameters_are_the_weights_that_get_no_gradient():
    """Counted from shapes on the meta device, checked against a real backward pass: a weight
    is dead exactly when its gradient is zero for a random input (the tiny preset, unfitted)."""
    import torch

    from tsesnet.programs.model_summary import dead_parameters

    torch.manual_seed(0)
    model = build_model("tiny", "meanpool")
    x = torch.randn(1, 2, 16, 32, 32)
    model(x).pow(2).sum().backward()
    zero = sum(
        int((m.weight.grad == 0).sum())
        for m in model.modules()
        if isinstance(m, torch.nn.Conv3d) and m.weight.grad is not None
    )
    with torch.device("meta"):
        counted = dead_parameters(build_model("tiny", "meanpool"), torch.empty(1, 2, 16, 32, 32))
    assert counted == zero > 0


@pytest.mark.parametrize(
    ("overrides", "dead", "exact_levels"),
    [
        # the first release's network: 50 of the bottleneck 5x5x5's 125 taps on 768 channels
        ({"ta_patch": (), "attn_exact_tokens": 0}, 50 * 768 * 768, [4]),
        ({}, 0, [2, 3, 4]),
        ({"attn_exact_tokens": 65536}, 0, [1, 2, 3, 4]),
    ],
)
def test_summary_reports_dead_weights_and_exact_levels(overrides, dead, exact_levels):
    s = model_summary("paper", "tsff", memory=False, **overrides)
    assert s["dead_params"] == dead
    assert [lv["level"] for lv in s["levels"] if lv["attention"].startswith("exact")] == (
        exact_levels
    )


def test_cli_table_lists_levels_and_dead_params(capsys):
    assert cli(_args("--fusion", "tsff")) == 0
    out = capsys.readouterr().out
    assert "dead params" in out and "| 1 | 8x16x16 | 2048 | 16 |" in out
    assert "exact (shared softmax)" in out and "pooled to 4x8x8" in out
