"""`tsesnet science` end to end on a tiny budget: cohorts, two rows trained and scored, README."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow

from tsesnet.cli import build_parser
from tsesnet.programs.science import BEGIN, END, run

TINY = Path(__file__).resolve().parents[1] / "platform" / "configs" / "tiny.yaml"


def test_science_trains_scores_and_fills_the_readme(tmp_path, ray_session, mlflow_uri):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\ntail\n")
    out = tmp_path / "sci"
    args = build_parser().parse_args(
        ["science", "--out", str(out), "--config", str(TINY), "--seeds", "3"]
        + ["--rows", "early_peak", "tsc", "--cases", "4", "--test-cases", "1"]
        + ["--shape", "16", "32", "32", "--readme", str(readme)]
        + ["--set", "data.patches_per_epoch=2", "--set", "data.fold=0"]
    )
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
