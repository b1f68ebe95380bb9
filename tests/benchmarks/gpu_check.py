"""The GPU check: the CUDA path end to end in one command, one table, one JSON file.

    python tests/benchmarks/gpu_check.py [--out FILE] [--only step train predict] [--budget-s 450]

Three parts, each a subprocess with its own time limit (a part that fails or runs out of time is
reported as such and the others still run), sized to finish in about 6 minutes on one H100/H200
and never past ``--budget-s`` (default 450 s; the limit is 8 minutes):

1. step: `gpu_step.py`, one training step of the paper preset (6 phases, 48x96x96, batch 1) in
   fp32, bf16, bf16 + channels_last_3d and bf16 + torch.compile: step time, achieved TFLOP/s,
   peak memory, and the relative error of the logits and of two gradients against a strict
   fp32 step (TF32 off).
2. train: a synthetic store (`tsesnet synth` + `tsesnet ingest`: 8 cases, 4 phases, 32x64x64),
   then `tsesnet train` with 1 worker on the GPU (``--gpus-per-worker 1``), the small preset
   (`tsesnet/configs/small.yaml`), 4 epochs, bf16, ``model.channels_last``, ``run.compile``
   and, where this build's config has it, the background loader (``data.loader_workers``):
   patches/s and ``data_wait_fraction`` from the MLflow run's metrics, over the epochs after
   the first (which compiles).
3. predict: `tsesnet predict` of that store with the model the run registered,
   ``--gpus-per-worker 1``: cases/min as the command reports it.

Everything is written under a temporary folder (store, MLflow database, Ray results, masks);
nothing is downloaded. The table is printed at the end and written as JSON to ``--out``
(default ``$OUT/gpu_check.json`` when ``$OUT`` is set, so a remote runner can fetch it, else
``./gpu_check.json``), rewritten after each part so that a run cut short keeps what it measured.
Without CUDA it prints one line and exits 0. Exit status: 0 when every part ran, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PARTS = ("step", "train", "predict")
EXPERIMENT, MODEL_NAME, RUN_NAME = "gpu-check", "gpu-check", "gpu-check"
LOADER_WORKERS = 2


@dataclass(frozen=True)
class Plan:
    """How big the train and predict parts are: on the GPU, or the CPU rehearsal."""

    gpus: float = 1.0
    epochs: int = 4
    patches_per_epoch: int = 256


GPU, REHEARSAL = Plan(), Plan(gpus=0.0, epochs=2, patches_per_epoch=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, metavar="FILE", help="JSON file (see the docstring)")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), metavar="PART")
    p.add_argument("--budget-s", type=float, default=450.0, help="all parts together")
    p.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it")
    p.add_argument(
        "--cpu-rehearsal",
        action="store_true",
        help="run the train and predict parts on the CPU, small: checks the commands, not speed",
    )
    return p.parse_args(argv)


def default_out(out: str | None) -> Path:
    """--out, else $OUT/gpu_check.json, else ./gpu_check.json."""
    if out:
        return Path(out)
    return (
        Path(os.environ["OUT"]) / "gpu_check.json"
        if os.environ.get("OUT")
        else Path("gpu_check.json")
    )


def no_cuda_reason() -> str | None:
    """Why the check cannot run here (one line), or None when a CUDA device is usable."""
    try:
        import torch
    except ImportError as err:
        return f"torch does not import ({err})"
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda})"
    return None


# ------------------------------------------------------------------------------ subprocesses


def tsesnet(*args: str) -> list[str]:
    """The `tsesnet` command as this interpreter runs it (no installed console script needed)."""
    return [sys.executable, "-m", "tsesnet.cli", *args]


def child_env(work: Path) -> dict[str, str]:
    """The environment of every subprocess: this checkout first on the path, MLflow in `work`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env["MLFLOW_ARTIFACTS_DESTINATION"] = str(work / "mlartifacts")
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, on this machine's GPU
    return env


def run(cmd: list[str], *, timeout_s: float, env: dict, cwd: Path, log: Path) -> tuple[int, str]:
    """(exit status, last 3000 characters of output); 124 when `timeout_s` ran out.

    The command runs in a session of its own, killed as a whole on a timeout: Ray's processes
    (GCS, raylet, workers holding the GPU) go with the driver that started them.
    """
    if timeout_s <= 1:
        return 124, "no time left in the budget"
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
    return rc, log.read_text(errors="replace")[-3000:]


# ------------------------------------------------------------------------------ the parts


def step_part(work: Path, env: dict, timeout_s: float, plan: Plan = GPU) -> dict:
    """gpu_step.py's rows (see its docstring)."""
    out = work / "step.json"
    script = str(ROOT / "tests" / "benchmarks" / "gpu_step.py")
    rc, tail = run(
        [sys.executable, script, "--json", str(out)],
        timeout_s=timeout_s,
        env=env,
        cwd=ROOT,
        log=work / "step.log",
    )
    result = json.loads(out.read_text()) if out.exists() else {"rows": []}
    return {**result, **_status(rc, tail)}


def train_overrides(loader_workers: int | None, plan: Plan = GPU) -> list[str]:
    """The ``--set`` values of the training run (``data.loader_workers`` only when given)."""
    sets = [
        f"schedule.epochs={plan.epochs}",
        "schedule.val_every=1000",  # validate at the last epoch only
        "schedule.checkpoint_every=1000",
        f"data.patches_per_epoch={plan.patches_per_epoch}",
        "data.batch_size=4",
        "data.max_val_cases=2",
        "optim.bf16=true",
        "model.channels_last=true",
        "run.compile=true",
        f"run.cpus_per_worker={(loader_workers or 0) + 2}",
        f"run.experiment={EXPERIMENT}",
        f"run.registered_model_name={MODEL_NAME}",
    ]
    if loader_workers is not None:
        sets.append(f"data.loader_workers={loader_workers}")
    return [a for s in sets for a in ("--set", s)]


def config_has(key: str) -> bool:
    """Whether this build's `TrainConfig` has a setting (e.g. ``data.loader_workers``)."""
    import dataclasses

    from tsesnet.training.config import TrainConfig

    section, _, name = key.partition(".")
    part = {f.name: f for f in dataclasses.fields(TrainConfig)}.get(section)
    return part is not None and name in {f.name for f in dataclasses.fields(part.default_factory)}


def train_part(work: Path, env: dict, timeout_s: float, plan: Plan = GPU) -> dict:
    """A synthetic store, a short GPU training run, its MLflow metrics."""
    t0, log, store = time.monotonic(), work / "train.log", work / "store.zarr"

    def left() -> float:
        return timeout_s - (time.monotonic() - t0)

    for cmd in (
        tsesnet(
            "synth", str(work / "raw"), "--cases", "8", "--shape", "32", "64", "64", "--phases", "4"
        ),
        tsesnet("ingest", str(work / "raw"), str(store), "--folds", "2"),
    ):
        rc, tail = run(cmd, timeout_s=left(), env=env, cwd=work, log=log)
        if rc != 0:
            return _status(rc, tail)
    workers = LOADER_WORKERS if config_has("data.loader_workers") else None
    cmd = tsesnet(
        "train", "--store", str(store), "--config", str(ROOT / "tsesnet/configs/small.yaml"),
        "--workers", "1", "--gpus-per-worker", f"{plan.gpus:g}", "--name", RUN_NAME,
        *train_overrides(workers, plan),
    )  # fmt: skip
    rc, tail = run(cmd, timeout_s=left(), env=env, cwd=work, log=log)
    out = {"loader_workers": workers, "store": str(store), **_status(rc, tail)}
    try:
        out.update(train_metrics(env["MLFLOW_TRACKING_URI"], EXPERIMENT))
    except Exception as err:  # no run: the status above says why
        out["metrics_error"] = f"{type(err).__name__}: {err}"
    return out


def train_metrics(tracking_uri: str, experiment: str) -> dict:
    """patches/s, data-wait fraction and seconds per epoch of the experiment's latest run.

    Medians over the epochs after the first (the first compiles), or over all when there is
    only one; a metric the run did not log is None.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    if not runs:
        raise LookupError(f"no run in MLflow experiment {experiment!r}")
    run_id = runs[0].info.run_id
    out = {"run_id": run_id, "run_status": runs[0].info.status}
    for key in ("patches_per_s", "data_wait_fraction", "data_wait_s", "epoch_time_s"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        values = [m.value for m in history]
        out[f"epochs_{key}"] = values
        out[key] = statistics.median(values[1:] or values) if values else None
    return out


def latest_model_uri(tracking_uri: str, name: str) -> str:
    """``models:/NAME/V`` of the newest registered version."""
    from mlflow.tracking import MlflowClient

    versions = MlflowClient(tracking_uri).search_model_versions(f"name='{name}'")
    if not versions:
        raise LookupError(f"no registered model {name!r}")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


def predict_part(work: Path, env: dict, timeout_s: float, plan: Plan = GPU) -> dict:
    """`tsesnet predict` on the GPU; cases/min as it prints it."""
    try:
        uri = latest_model_uri(env["MLFLOW_TRACKING_URI"], MODEL_NAME)
    except Exception as err:  # the train part did not register a model
        return {"status": "failed", "log_tail": f"no model to predict with: {err}"}
    cmd = tsesnet(
        "predict", "--model", uri, "--input", str(work / "store.zarr"), "--output",
        str(work / "pred"), "--workers", "1", "--gpus-per-worker", f"{plan.gpus:g}",
    )  # fmt: skip
    t0 = time.monotonic()
    rc, tail = run(cmd, timeout_s=timeout_s, env=env, cwd=work, log=work / "predict.log")
    return {
        "model": uri,
        "cases_per_min": cases_per_min(tail),
        "command_s": time.monotonic() - t0,
        **_status(rc, tail),
    }


def cases_per_min(output: str) -> float | None:
    """The "(X cases/min)" that `tsesnet predict` prints at the end, or None."""
    found = re.findall(r"\(([0-9.]+) cases/min\)", output)
    return float(found[-1]) if found else None


def _status(rc: int, tail: str) -> dict:
    status = "ok" if rc == 0 else "timeout" if rc == 124 else "failed"
    return {"status": status, "exit": rc, "log_tail": tail if status != "ok" else tail[-600:]}


# ------------------------------------------------------------------------------ the table


def table(report: dict) -> list[str]:
    """One markdown table of every part's results."""
    lines = ["| part | item | value | details |", "|---|---|---|---|"]
    parts = report["parts"]
    for r in parts.get("step", {}).get("rows", []):
        if "error" in r:
            lines.append(f"| step | {r['mode']} | failed | {r['error'][:160]} |")
            continue
        peak = "n/a" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f} GiB"
        lines.append(
            f"| step | {r['mode']} | {r['step_ms']:.1f} ms, {r['tflops']:.1f} TFLOP/s | peak "
            f"{peak}; rel. err. logits {r['rel_err_logits']:.1e}, grad first conv "
            f"{r['rel_err_grad_first_conv']:.1e}, grad bottleneck TA "
            f"{r['rel_err_grad_bottleneck_ta']:.1e}; first step {r['first_step_s']:.0f} s |"
        )
    if "train" in parts:
        lines.append(_train_row(parts["train"]))
    if "predict" in parts:
        p = parts["predict"]
        cpm = p.get("cases_per_min")
        value = "n/a" if cpm is None else f"{cpm:.1f} cases/min"
        lines.append(f"| predict | 8 cases, 1 GPU actor | {value} | {p.get('model', '')} |")
    for name, part in parts.items():
        if part.get("status") != "ok":
            tail = " ".join(part.get("log_tail", "").split())[-240:].replace("|", "/")
            lines.append(f"| {name} | status | {part.get('status')} | {tail} |")
    return lines


def _train_row(t: dict) -> str:
    pps, wait = t.get("patches_per_s"), t.get("data_wait_fraction")
    value = "n/a" if pps is None else f"{pps:.1f} patches/s"
    loader = t.get("loader_workers")
    loader_text = f"{loader} loader processes" if loader is not None else "no data.loader_workers"
    wait_text = "not logged" if wait is None else f"{wait:.1%}"
    return (
        f"| train | small preset, bf16 + channels_last + compile, epochs 2-{t.get('epochs')} "
        f"| {value} | data_wait_fraction {wait_text}; {loader_text} |"
    )


def save(report: dict, out: Path) -> None:
    report["table"] = table(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = default_out(args.out)
    reason = no_cuda_reason()
    if reason is not None and not args.cpu_rehearsal:
        print(f"gpu_check: {reason}; nothing to check here (run it on a GPU machine).")
        if args.out or os.environ.get("OUT"):  # a remote runner fetches a file: leave one
            save({"cuda": False, "reason": reason, "parts": {}}, out)
        return 0
    import torch

    plan = REHEARSAL if args.cpu_rehearsal else GPU
    only = [p for p in args.only if not (args.cpu_rehearsal and p == "step")]
    device = torch.cuda.get_device_name() if plan.gpus else "cpu (rehearsal)"
    report = {"cuda": reason is None, "device": device, "torch": torch.__version__, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run_parts(report, only, work, plan, args.budget_s, out)
    print(f"\n{report['device']}, torch {report['torch']}\n")
    print("\n".join(report["table"]))
    print(f"\n(written to {out})")
    return 0 if all(p.get("status") == "ok" for p in report["parts"].values()) else 1


def run_parts(report: dict, only: list[str], work: Path, plan: Plan, budget_s: float, out) -> None:
    """Each part in turn within the budget (time is kept for the later ones); saved after each."""
    reserve = {"step": 0.0, "train": 170.0, "predict": 60.0}  # kept for a part while others run
    functions = {"step": step_part, "train": train_part, "predict": predict_part}
    env, end = child_env(work), time.monotonic() + budget_s
    for name in only:
        t0, left = time.monotonic(), end - time.monotonic()
        later = sum(reserve[p] for p in only if PARTS.index(p) > PARTS.index(name))
        print(f"gpu_check: {name} (up to {left - later:.0f} s) ...", flush=True)
        report["parts"][name] = functions[name](work, env, left - later, plan)
        report["parts"][name]["seconds"] = time.monotonic() - t0
        if name == "train":
            report["parts"][name]["epochs"] = plan.epochs
        save(report, out)
    if not only:
        save(report, out)


if __name__ == "__main__":
    sys.exit(main())
