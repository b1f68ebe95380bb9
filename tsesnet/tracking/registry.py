"""The MLflow model registry: log a trained TSESNet, gate `champion`/`challenger`, load it back.

What a registered version holds (an MLflow "models from code" pyfunc, `tsesnet/tracking/pyfunc.py`):
`artifacts/weights.pt`, a plain `state_dict` of tensors loaded with `torch.load(...,
weights_only=True)`, and `artifacts/model_config.json`, the `ModelConfig` fields, the patch and
the validation lineage. Nothing is unpickled into code on load: `load_model` rebuilds the network
with `build_model` and loads the tensors into it.

Gating: a new version gets the alias `champion` only if its validation Dice beats the current
champion's *on the same validation fold of the same store* (store fingerprint and fold, as
version tags); otherwise it gets `challenger`. Aliases, never the deprecated stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data_store.errors import InputError

DEFAULT_NAME = "tsesnet"
CHAMPION, CHALLENGER = "champion", "challenger"
WEIGHTS_FILE, CONFIG_FILE = "weights.pt", "model_config.json"
FORMAT = "tsesnet-weights-v1"
# What `model_config.json`'s "training_data" holds (absent in models registered before it).
TRAINING_DATA_KEYS = ("phases", "spacing_mm_min", "spacing_mm_max", "orientations")


@dataclass
class Registration:
    """The outcome of `log_and_register`."""

    name: str
    version: str
    alias: str
    model_uri: str
    reason: str


@dataclass
class LoadedModel:
    """A network ready for sliding-window prediction.

    Attributes:
        model: the TSESNet in eval mode, on CPU.
        patch: (Z, Y, X) window size it was trained with.
        config: the JSON config stored with it (model config, patch, lineage, val Dice, the
            connected-component filter `min_component_fraction`).
        uri: the URI it was loaded from.
    """

    model: object
    patch: tuple[int, int, int]
    config: dict
    uri: str


def client():
    """An MLflow client on `runs.tracking_uri()` (the database created if new)."""
    import mlflow

    from tsesnet.tracking import runs

    runs.configure()
    return mlflow.MlflowClient()


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _old_dice(text: str | None, new_dice: float) -> tuple[float, float]:
    """(champion's Dice, the new Dice as comparable to it).

    Versions registered before full precision stored `f"{dice:.6f}"`: the new Dice is rounded
    the same way, so identical weights tie instead of "beating" themselves by rounding.
    """
    old = float(text) if text else float("nan")
    if text and "." in text and len(text.split(".")[1]) == 6 and "e" not in text.lower():
        return old, round(new_dice, 6)
    return old, new_dice


def decide_alias(new_dice: float, lineage: dict, champion) -> tuple[str, str]:
    """`champion` if `new_dice` strictly beats the champion's on the same fold/store (a tie never
    moves it), else `challenger`.

    Args:
        new_dice: the new version's validation Dice, at full precision.
        lineage: {"store_fingerprint", "fold"} of the new version's validation.
        champion: the current champion `ModelVersion`, or None.

    Returns:
        (alias, a sentence saying why).
    """
    if champion is None:
        return CHAMPION, "no champion yet"
    tags = champion.tags or {}
    same_fold = tags.get("store_fingerprint") == str(lineage["store_fingerprint"]) and tags.get(
        "fold"
    ) == str(lineage["fold"])
    if not same_fold:
        # A store indexed before fingerprint version 2 (data_store.index) gets a new
        # fingerprint when it is next written, although its data may be the same: say so.
        return CHALLENGER, (
            f"champion v{champion.version} was validated on another store/fold (store "
            f"fingerprint {tags.get('store_fingerprint', '?')}, fold {tags.get('fold', '?')}; "
            f"this version: {lineage['store_fingerprint']}, fold {lineage['fold']}); a store "
            "re-indexed since fingerprints cover folds and case attributes (version 2) has a "
            "new fingerprint for the same data: promote by hand if it is the same store and folds"
        )
    old, new = _old_dice(tags.get("val_dice"), new_dice)
    a, b = _as_distinct_text(new, old)
    if old != old or new > old:  # NaN: a champion without a score loses
        return CHAMPION, f"val Dice {a} beats champion v{champion.version} ({b})"
    verb = "ties" if new == old else "does not beat"
    return CHALLENGER, f"val Dice {a} {verb} champion v{champion.version} ({b})"


def _as_distinct_text(a: float, b: float) -> tuple[str, str]:
    """Both numbers with 4 decimals, or as many more as it takes to tell them apart."""
    for digits in range(4, 18):
        ta, tb = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if ta != tb or a == b or a != a or b != b:
            return ta, tb
    return repr(a), repr(b)


def log_and_register(
    *,
    run_id: str,
    weights: dict,
    model_config: dict,
    patch: tuple[int, int, int],
    phases: int | None,
    val_dice: float,
    lineage: dict,
    name: str = DEFAULT_NAME,
    min_component_fraction: float = 0.0,
    training_data: dict | None = None,
    val_hd95: float | None = None,
) -> Registration:
    """Log the weights as an MLflow model in `run_id`, register it and set its alias.

    Args:
        run_id: the MLflow run the model belongs to.
        weights: the state_dict of the unwrapped module (tensors on CPU).
        model_config: `dataclasses.asdict(model.config)` of the trained network.
        patch: training patch (Z, Y, X), the sliding-window size for prediction.
        phases: phase count T seen in training (for the input example); None means 2.
        val_dice: mean validation Dice of these weights.
        lineage: {"store_fingerprint", "fold", "store", "git_commit", "run_name", ...} of the
            validation, stored as version tags and in the version's description.
        name: registered model name.
        min_component_fraction: the connected-component filter chosen on validation
            (`tsesnet.postprocess`); prediction applies it.
        training_data: what the training cases looked like, for prediction to warn about
            unlike scans: {"phases": [lo, hi], "spacing_mm_min": [z, y, x], "spacing_mm_max":
            [z, y, x], "orientations": ["RAS", ...]} (`TRAINING_DATA_KEYS`); None when unknown.
        val_hd95: mean validation HD95 (mm) at the same epoch, for the description.
    """
    import math

    bad = [k for k, t in weights.items() if t.is_floating_point() and not t.isfinite().all()]
    if not math.isfinite(float(val_dice)) or bad:
        what = f"weight {bad[0]}" if bad else f"val Dice {val_dice}"
        raise InputError(f"not registered: {what} is not finite (the run diverged)")
    mlc = client()
    cfg = {
        "format": FORMAT,
        "model_config": model_config,
        "patch": [int(p) for p in patch],
        "phases": phases,
        "val_dice": float(val_dice),
        "min_component_fraction": float(min_component_fraction),
        "lineage": {k: (v if isinstance(v, int | float) else str(v)) for k, v in lineage.items()},
        "training_data": training_data,
    }
    info = _log_model(run_id, weights, cfg)
    with _alias_gate():
        return _register_and_gate(mlc, info, name, run_id, float(val_dice), val_hd95, lineage,
                                  model_config, min_component_fraction)  # fmt: skip


@contextlib.contextmanager
def _alias_gate():
    """One registration at a time decides and sets its alias: an `flock` of a file beside an
    SQLite tracking database (``mlflow.db.alias-gate.lock``), held from reading the champion to
    moving the alias, so that two registrations at once cannot both read the old champion and
    the worse one set @champion last. A tracking server offers no such lock (see README)."""
    from tsesnet.tracking import runs

    uri = runs.tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    with runs._exclusive(Path(uri[len("sqlite:///") :] + ".alias-gate.lock")):
        yield


def _register_and_gate(
    mlc, info, name, run_id, val_dice, val_hd95, lineage, model_config, min_component_fraction
) -> Registration:
    import mlflow

    alias, reason = decide_alias(float(val_dice), lineage, _champion(mlc, name))
    _describe_model(mlc, name)
    mv = mlflow.register_model(info.model_uri, name)
    tags = {
        "val_dice": repr(float(val_dice)),
        "val_hd95": "" if val_hd95 is None else repr(float(val_hd95)),
        "min_component_fraction": f"{float(min_component_fraction):g}",
        "run_id": run_id,
        **{k: str(v) for k, v in lineage.items()},
        "preset": str(model_config.get("preset")),
        "fusion": str(model_config["fusion"]),
        # what happened at registration; the alias itself may move later (`tsesnet models`)
        "registered_as": alias,
        "registration_reason": reason,
    }
    for k, v in tags.items():
        mlc.set_model_version_tag(name, mv.version, k, v)
    mlc.update_model_version(name, mv.version, description=_version_description(tags))
    mlc.set_registered_model_alias(name, alias, mv.version)
    mlc.set_tag(run_id, "tsesnet.model_version", str(mv.version))
    return Registration(name, str(mv.version), alias, f"models:/{name}/{mv.version}", reason)


MODEL_DESCRIPTION = (
    "TSESNet segmentation models for breast tumours in 4D DCE-MRI, registered by the tsesnet "
    "platform. Every training run (and the best trial of every sweep) registers its best "
    "checkpoint as a new version. The alias @champion moves to a new version only when its "
    "validation Dice strictly beats the champion's on the same store and fold; otherwise the "
    "new version is @challenger. `tsesnet models promote NAME VERSION --alias A --reason TEXT` "
    "moves an alias by hand and records who, when and why on the versions involved. Load a "
    "version with `tsesnet predict --model models:/NAME@champion` (weights only, no code)."
)


def _describe_model(mlc, name: str) -> None:
    """Create the registered model with its description, or fill a missing description."""
    from mlflow.exceptions import MlflowException

    try:
        rm = mlc.get_registered_model(name)
    except MlflowException:
        with contextlib.suppress(MlflowException):  # another run may create it meanwhile
            mlc.create_registered_model(name, description=MODEL_DESCRIPTION)
        return
    if not rm.description:
        mlc.update_registered_model(name, description=MODEL_DESCRIPTION)


def _version_description(t: dict) -> str:
    hd95 = f", HD95 {float(t['val_hd95']):.2f} mm" if t.get("val_hd95") else ""
    lines = [
        f"TSESNet {t['preset']}/{t['fusion']}: validation DSC {float(t['val_dice']):.4f}{hd95} "
        f"on fold {t.get('fold', '?')} of store {t.get('store', '?')} "
        f"(fingerprint {t.get('store_fingerprint', '?')}).",
        f"Run {t.get('run_name') or t['run_id']} (MLflow run {t['run_id']}), code "
        f"{t.get('git_commit', 'unknown')}; prediction keeps components >= "
        f"{t['min_component_fraction']} x the largest.",
        f"Registered as @{t['registered_as']}: {t['registration_reason']}.",
    ]
    return "\n\n".join(lines)


def _log_model(run_id: str, weights: dict, cfg: dict):
    """Log `weights.pt` and `model_config.json` as the pyfunc model `model` of the run."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    divisor = 2 ** (len(cfg["model_config"]["channels"]) - 1)
    # A small example (smaller than a patch: prediction pads), so the MLmodel stays small.
    t = cfg["phases"] or 2
    example = np.zeros((1, t, divisor, divisor, divisor), np.float32)  # (B, T, Z, Y, X)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1, -1))]),
    )
    with tempfile.TemporaryDirectory() as d:
        w, c = Path(d) / WEIGHTS_FILE, Path(d) / CONFIG_FILE
        torch.save(weights, w)
        c.write_text(json.dumps(cfg, indent=1))
        with mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc.py")),
                artifacts={"weights": str(w), "config": str(c)},
                signature=signature,
                input_example=example,
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"mlflow=={mlflow.__version__}",
                    "numpy",
                    "scipy",
                ],
            )


def _build(cfg: dict):
    import torch

    from tsesnet.model import build_model, upgrade_config

    if cfg.get("format") != FORMAT:
        raise InputError(f"not a TSESNet model (format {cfg.get('format')!r}, want {FORMAT!r})")
    mc = upgrade_config(cfg["model_config"])
    preset, fusion = mc.pop("preset"), mc.pop("fusion")
    return build_model(preset, fusion, **mc), torch


def load_model_files(weights: str | Path, config: str | Path, uri: str = "") -> LoadedModel:
    """Rebuild a TSESNet from `weights.pt` (weights_only) and `model_config.json`."""
    cfg = json.loads(Path(config).read_text())
    model, torch = _build(cfg)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    return LoadedModel(model, tuple(int(p) for p in cfg["patch"]), cfg, uri or str(weights))


def load_model(uri: str) -> LoadedModel:
    """Load a registered TSESNet for sliding-window prediction, without running pickled code.

    Args:
        uri: `models:/tsesnet@champion`, `models:/tsesnet/3`, `runs:/<id>/model`, a logged
            model's `models:/m-...` or a local model directory.

    Raises:
        InputError: the URI does not resolve to a TSESNet model.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client()
    try:
        local = Path(
            uri if Path(uri).is_dir() else mlflow.artifacts.download_artifacts(artifact_uri=uri)
        )
    except (MlflowException, OSError) as err:
        raise InputError(f"cannot load model {uri}: {str(err).splitlines()[0]}") from err
    folder = check_one_model(local, uri)
    return load_model_files(folder / WEIGHTS_FILE, folder / CONFIG_FILE, uri)


def check_one_model(folder: Path, uri: str) -> Path:
    """The one folder under `folder` holding a model (`weights.pt` + `model_config.json`).

    Raises:
        InputError: no model there, or more than one (never silently load one of several).
    """
    found = sorted({p.parent for name in (CONFIG_FILE, WEIGHTS_FILE) for p in folder.rglob(name)})
    complete = [d for d in found if (d / CONFIG_FILE).is_file() and (d / WEIGHTS_FILE).is_file()]
    if not complete:
        raise InputError(f"{uri} is not a TSESNet model (no {WEIGHTS_FILE}/{CONFIG_FILE})")
    if len(found) > 1:
        names = [str(d.relative_to(folder)) or "." for d in found]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        raise InputError(
            f"--model must name exactly one model, but this folder holds {len(found)} "
            f"(folders with {CONFIG_FILE} or {WEIGHTS_FILE}: {shown}); pass one of them",
            path=uri,
        )
    return complete[0]


def model_config_dict(model) -> dict:
    """The JSON-able `ModelConfig` of a built network (what `log_and_register` stores)."""
    return dataclasses.asdict(model.config)


def quote_name(name: str) -> str:
    """A registered model name as an MLflow search literal."""
    from tsesnet.tracking.runs import quote

    return quote(name)
