"""What a user sees in the MLflow UI through the links tsesnet prints: `platform/ui_screenshots.py`
renders them in headless Chromium after a real training run (skipped where Chromium is absent)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "platform" / "ui_screenshots.py"


@pytest.mark.slow
@pytest.mark.skipif(
    not shutil.which("chromium"), reason="no chromium (Debian: apt install chromium)"
)
def test_the_printed_links_open_on_what_the_user_wants(trained_tiny, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=trained_tiny.tracking_uri)
    (version,) = client.search_model_versions("name = 'tsesnet'")
    fingerprint = version.tags["store_fingerprint"]

    out = tmp_path / "shots"
    cmd = [sys.executable, str(SCRIPT), "--tracking-uri", trained_tiny.tracking_uri,
           "--artifacts", trained_tiny.artifacts, "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = {p.stem: p.read_text() for p in out.glob("*.txt")}
    assert set(text) == {"runs_table", "run", "model", "version"}
    for page in text:
        assert (out / f"{page}.png").stat().st_size > 10_000, page  # a rendered page, not blank
    # The runs table (not the GenAI overview) lists the run and the data it was trained on.
    run = trained_tiny.run_name
    assert run in text["runs_table"] and "tiny.zarr" in text["runs_table"]
    # The run page: its metrics and its dataset.
    assert "val_dice" in text["run"] and "tiny.zarr" in text["run"]
    # The registered model says how its aliases move; the version what it is and where from.
    assert "@champion" in text["model"]
    assert "validation DSC" in text["version"] and fingerprint in text["version"]


def test_without_chromium_the_script_says_so_in_one_line(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--chromium", str(tmp_path / "none"), "--out", "x"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr
    assert not (tmp_path / "x").exists()
