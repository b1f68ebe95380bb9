"""Screenshots of what a user sees in the MLflow UI, through the links tsesnet prints.

    .venv/bin/python platform/ui_screenshots.py [--tracking-uri sqlite:///mlflow.db]
        [--model tsesnet] [--out ui_screenshots]

Serves the tracking store with `mlflow server` on a free loopback port, opens the four pages a
user is sent to (the experiment's runs table, the registered version's training run, the
registered model, the version) in headless Chromium (Debian's `chromium` package) and writes, per
page, a PNG and the rendered page's text (`NAME.png`, `NAME.txt`). Exit 2 with one line when
Chromium or the model is missing. `tests/test_ui_screenshots.py` runs it on a trained model.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PAGES = ("runs_table", "run", "model", "version")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tracking_uri: str, artifacts: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
           "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    # MLflow's GenAI job runner off: 7 processes for jobs nobody submits (see mlflow_server.sh).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: mlflow server exited {server.returncode} (log: {log})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"error: mlflow server did not answer on port {port} in 120 s (log: {log})")


def _shoot(chromium: str, url: str, png: Path, profile: Path) -> str:
    """Screenshot one page; return its rendered text."""
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--window-size=1440,1000",
            "--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw"]  # fmt: skip
    subprocess.run([*base, f"--screenshot={png}", url], capture_output=True, timeout=180,
                   check=True)  # fmt: skip
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                         check=True).stdout  # fmt: skip
    dom = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", dom)
    return " ".join(html.unescape(re.sub(r"(?s)<[^>]+>", " ", dom)).split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--artifacts", default="./mlartifacts")
    parser.add_argument("--model", default="tsesnet", help="registered model name")
    parser.add_argument("--out", default="ui_screenshots", type=Path)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args(argv)
    if not shutil.which(args.chromium):
        print(f"error: {args.chromium}: not found (Debian: apt install chromium)", file=sys.stderr)
        return 2

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=args.tracking_uri)
    versions = client.search_model_versions(f"name = '{args.model}'")
    if not versions:
        print(f"error: {args.tracking_uri}: no registered model {args.model!r}", file=sys.stderr)
        return 2
    version = max(versions, key=lambda v: int(v.version))
    experiment = client.get_run(version.run_id).info.experiment_id

    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    os.environ["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"  # the links point at it
    from tsesnet.tracking.runs import experiment_link, model_link, run_link

    urls = {
        "runs_table": experiment_link(experiment),
        "run": run_link(experiment, version.run_id),
        "model": model_link(args.model),
        "version": model_link(args.model, version.version),
    }
    server = _serve(args.tracking_uri, args.artifacts, port, args.out / "mlflow_server.log")
    try:
        with tempfile.TemporaryDirectory() as profile:
            for name in PAGES:
                text = _shoot(args.chromium, urls[name], args.out / f"{name}.png", Path(profile))
                (args.out / f"{name}.txt").write_text(f"{urls[name]}\n{text}\n")
                print(f"{name}: {urls[name]} -> {args.out / name}.png")
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
