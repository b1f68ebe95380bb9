"""`tsesnet science` end to end on a tiny budget: cohorts, two rows trained and scored, the docs
page its table goes into."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tsesnet.cli import build_parser
from tsesnet.programs.science import BEGIN, END, paired_difference, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tsesnet" / "configs" / "tiny.yaml"


def test_science_trains_scores_and_fills_the_docs_page(tmp_path, ray_session, mlflow_uri):
    readme = tmp_path / "science.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\ntail\n")
    out = tmp_path / "sci"
    argv = (
        ["science", "--out", str(out), "--config", str(TINY)]
        + ["--rows", "early_peak", "tsc", "--cases", "4", "--test-cases", "1"]
        + ["--shape", "16", "32", "32", "--docs", str(readme)]
        + ["--set", "data.patches_per_epoch=2", "--set", "data.fold=0"]
    )
    args = build_parser().parse_args([*argv, "--seeds", "3"])
    assert run(args) == 0

    text = readme.read_text()
    assert text.startswith(f"intro\n{BEGIN}\n") and text.endswith(f"{END}\ntail\n")
    assert "old table" not in text
    assert "`early`, peak phase only" in text and "Table 3 +TSC (no TA)" in text
    rows = list(csv.DictReader((out / "science.csv").open()))
    assert [r["row"] for r in rows] == ["early_peak", "tsc"]
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tsesnet-science")
    runs = {r.data.tags["tsesnet.run_name"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"science-s3-early_peak", "science-s3-tsc"}
    peak = runs["science-s3-early_peak"].data.params
    assert peak["model.fusion"] == "early" and peak["model.phases"] not in ("[]", "()")
    ablated = runs["science-s3-tsc"].data.params
    assert ablated["model.tumor_aware"] == "False" and float(ablated["loss.beta"]) > 0
    assert {"dice_filtered", "hd95_filtered", "config_hash"} <= set(rows[0])

    # Runnable in parts and resumable: what was scored is reused, not trained or scored again.
    before = (out / "science.csv").read_text()
    assert run(args) == 0
    assert (out / "science.csv").read_text() == before
    table = readme.read_text()
    assert "Table 3 +TSC (no TA)" in table
    # `--no-train` tabulates what is scored and trains nothing (seed 9 never ran).
    assert run(build_parser().parse_args([*argv, "--seeds", "3", "9", "--no-train"])) == 0
    assert (out / "science.csv").read_text() == before and not (out / "seed9").exists()
    assert readme.read_text() == table.replace("| 1/1 |", "| 1/2 |").replace(
        "Seeds 3;", "Seeds 3, 9;"
    )


def test_paired_difference_is_a_t_interval_over_seeds():
    from scipy import stats

    base = {0: 0.30, 1: 0.40, 2: 0.35, 3: 0.20, 4: 0.50}
    row = {0: 0.40, 1: 0.45, 2: 0.30, 3: 0.35, 4: 0.55, 9: 0.99}  # seed 9 has no pair
    mean, lo, hi, n = paired_difference(row, base)
    d = [0.10, 0.05, -0.05, 0.15, 0.05]
    half = stats.t.ppf(0.975, 4) * stats.tstd(d) / 5**0.5
    assert n == 5 and mean == pytest.approx(0.06)
    assert (lo, hi) == pytest.approx((0.06 - half, 0.06 + half))
    assert paired_difference({0: 0.5}, {0: 0.4})[3] == 1


def test_make_science_fills_the_docs_page_and_readme_is_its_other_name():
    """`make science` names a page that holds the markers; `--readme`, the option's first name,
    still works."""
    from tsesnet.programs.science import check_page

    recipe = re.search(r"^science:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    page = recipe.split("--docs ", 1)[1].split()[0]
    assert page == "docs/pages/explanation/science.md"
    assert "| configuration | DSC |" in check_page(ROOT / page)
    for spelling in ("--docs", "--readme"):
        assert build_parser().parse_args(["science", spelling, page]).docs == page


@pytest.mark.parametrize("content", [None, "a page without the markers\n"])
def test_a_page_that_cannot_take_the_table_stops_before_anything_runs(tmp_path, content):
    page = tmp_path / "science.md"
    if content is not None:
        page.write_text(content)
    out = tmp_path / "sci"
    cmd = [str(Path(sys.executable).parent / "tsesnet"), "science", "--out", str(out)]
    cmd += ["--docs", str(page)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --docs {page}:"), lines
    assert not out.exists()  # nothing made, nothing trained
    assert page.read_text() == content if content is not None else not page.exists()
