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


def _client():
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


def decide_alias(new_dice: float, lineage: dict, champion) -> tuple[str, str]:
    """`champion` if `new_dice` beats the champion's on the same fold/store, else `challenger`.

    Args:
        new_dice: the new version's validation Dice.
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
        return CHALLENGER, (
            f"champion v{champion.version} was validated on another store/fold; "
            "promote by hand if wanted"
        )
    old = float(tags.get("val_dice", "nan"))
    if old != old or new_dice > old:  # NaN: a champion without a score loses
        return CHAMPION, f"val Dice {new_dice:.4f} beats champion v{champion.version} ({old:.4f})"
    return (
        CHALLENGER,
        f"val Dice {new_dice:.4f} does not beat champion v{champion.version} ({old:.4f})",
    )


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
) -> Registration:
    """Log the weights as an MLflow model in `run_id`, register it and set its alias.

    Args:
        run_id: the MLflow run the model belongs to.
        weights: the state_dict of the unwrapped module (tensors on CPU).
        model_config: `dataclasses.asdict(model.config)` of the trained network.
        patch: training patch (Z, Y, X), the sliding-window size for prediction.
        phases: phase count T seen in training (for the input example); None means 2.
        val_dice: mean validation Dice of these weights.
        lineage: {"store_fingerprint", "fold", ...} of the validation, stored as version tags.
        name: registered model name.
        min_component_fraction: the connected-component filter chosen on validation
            (`tsesnet.postprocess`); prediction applies it.
        training_data: what the training cases looked like, for prediction to warn about
            unlike scans: {"phases": [lo, hi], "spacing_mm_min": [z, y, x], "spacing_mm_max":
            [z, y, x], "orientations": ["RAS", ...]} (`TRAINING_DATA_KEYS`); None when unknown.
    """
    import mlflow

    client = _client()
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
    champion = _champion(client, name)
    alias, reason = decide_alias(float(val_dice), lineage, champion)
    mv = mlflow.register_model(info.model_uri, name)
    tags = {
        "val_dice": f"{float(val_dice):.6f}",
        "min_component_fraction": f"{float(min_component_fraction):g}",
        "run_id": run_id,
    }
    tags.update({k: str(v) for k, v in lineage.items()})
    tags.update({"preset": str(model_config.get("preset")), "fusion": str(model_config["fusion"])})
    for k, v in tags.items():
        client.set_model_version_tag(name, mv.version, k, v)
    client.set_registered_model_alias(name, alias, mv.version)
    client.set_tag(run_id, "tsesnet.model_version", str(mv.version))
    client.set_tag(run_id, "tsesnet.model_alias", alias)
    client.set_tag(run_id, "tsesnet.model_alias_reason", reason)
    return Registration(name, str(mv.version), alias, f"models:/{name}/{mv.version}", reason)


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

    _client()
    try:
        local = Path(
            uri if Path(uri).is_dir() else mlflow.artifacts.download_artifacts(artifact_uri=uri)
        )
    except (MlflowException, OSError) as err:
        raise InputError(f"cannot load model {uri}: {str(err).splitlines()[0]}") from err
    weights = next(local.rglob(WEIGHTS_FILE), None)
    config = next(local.rglob(CONFIG_FILE), None)
    if weights is None or config is None:
        raise InputError(f"{uri} is not a TSESNet model (no {WEIGHTS_FILE}/{CONFIG_FILE})")
    return load_model_files(weights, config, uri)


def model_config_dict(model) -> dict:
    """The JSON-able `ModelConfig` of a built network (what `log_and_register` stores)."""
    return dataclasses.asdict(model.config)


# ---------------------------------------------------------------- the `tsesnet models` commands


def _aliases_by_version(rm) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, version in (rm.aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return out


def list_models() -> list[dict]:
    """Registered models: name, latest version, aliases -> version."""
    client = _client()
    rows = []
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{rm.name}'")
        rows.append(
            {
                "name": rm.name,
                "versions": len(versions),
                "latest": max((int(v.version) for v in versions), default=None),
                "aliases": {a: str(v) for a, v in (rm.aliases or {}).items()},
            }
        )
    return sorted(rows, key=lambda r: r["name"])


def show_model(name: str) -> dict:
    """All versions of one registered model with aliases, val Dice, fold and run."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        rm = client.get_registered_model(name)
    except MlflowException as err:
        raise InputError(f"no registered model named {name!r}") from err
    by_version = _aliases_by_version(rm)
    versions = []
    for v in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        t = v.tags or {}
        versions.append(
            {
                "version": str(v.version),
                "aliases": sorted(by_version.get(str(v.version), [])),
                "val_dice": float(t["val_dice"]) if "val_dice" in t else None,
                "fold": t.get("fold"),
                "store_fingerprint": t.get("store_fingerprint"),
                "preset": t.get("preset"),
                "fusion": t.get("fusion"),
                "run_id": v.run_id,
                "run_name": t.get("run_name"),
                "source": v.source,
            }
        )
    return {
        "name": name,
        "aliases": {a: str(v) for a, v in (rm.aliases or {}).items()},
        "versions": versions,
    }


def promote(name: str, version: str, alias: str) -> None:
    """Point `alias` of model `name` at `version` (moving it from any other version)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_model_version(name, str(version))
    except MlflowException as err:
        raise InputError(f"model {name!r} has no version {version}") from err
    client.set_registered_model_alias(name, alias, str(version))


def cli_list(args) -> int:
    """`tsesnet models list [--json]`."""
    rows = list_models()
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no registered models")
        return 0
    print(f"{'name':<24} {'versions':>8} {'latest':>6}  aliases")
    for r in rows:
        aliases = ", ".join(f"@{a}=v{v}" for a, v in sorted(r["aliases"].items()))
        print(f"{r['name']:<24} {r['versions']:>8} {r['latest'] or '-':>6}  {aliases}")
    return 0


def cli_show(args) -> int:
    """`tsesnet models show NAME [--json]`."""
    info = show_model(args.name)
    if getattr(args, "json", False):
        print(json.dumps(info, indent=1))
        return 0
    print(
        f"{info['name']}: "
        + (", ".join(f"@{a}=v{v}" for a, v in info["aliases"].items()) or "no aliases")
    )
    print(f"{'version':>7}  {'aliases':<22} {'val DSC':>7}  {'fold':>4}  {'model':<16} run")
    for v in info["versions"]:
        dsc = f"{v['val_dice']:.4f}" if v["val_dice"] is not None else "-"
        model = f"{v['preset']}/{v['fusion']}"
        print(
            f"{v['version']:>7}  {','.join(v['aliases']) or '-':<22} {dsc:>7}  "
            f"{v['fold'] or '-':>4}  {model:<16} {v['run_name'] or v['run_id']}"
        )
    return 0


def cli_promote(args) -> int:
    """`tsesnet models promote NAME VERSION --alias A`."""
    promote(args.name, args.version, args.alias)
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0
