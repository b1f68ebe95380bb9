"""The MLflow model registry: log a trained TSESNet, gate `champion`/`challenger`, load it back.

What a registered version holds (an MLflow "models from code" pyfunc, `tsesnet/tracking/pyfunc.py`):
`artifacts/weights.pt`, a plain `state_dict` of tensors loaded with `torch.load(...,
weights_only=True)`, and `artifacts/model_config.json`, the `ModelConfig` fields, the patch and
the validation lineage. Nothing is unpickled into code on load: `load_model` rebuilds the network
with `build_model` and loads the tensors into it.

Gating: a new version gets the alias `champion` only if its validation Dice strictly beats the
current champion's *under the same validation protocol* (`tsesnet.tracking.protocol`: store
fingerprint, fold, validation cases, window, overlap, post-processing; version tags); otherwise
it gets `challenger`, and its tag `registration_reason` says why in one line. A champion without a
recorded protocol is never beaten automatically. The version that loses `@champion` records by
which version, when and why. Registrations decide one at a time, in version order, on SQLite and
on a tracking server alike (`_register_gated`). Aliases, never the deprecated stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data_store.errors import InputError
from tsesnet.common.training_record import RECORD_KEY, TrainingRecord
from tsesnet.tracking import protocol

DEFAULT_NAME = "tsesnet"
CHAMPION, CHALLENGER = "champion", "challenger"
WEIGHTS_FILE, CONFIG_FILE = "weights.pt", "model_config.json"
FORMAT = "tsesnet-weights-v1"


@dataclass
class Registration:
    """The outcome of `log_and_register`."""

    name: str
    version: str
    alias: str
    model_uri: str
    reason: str
    replaced: str | None = None  # the version that held the alias before, if another


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


def decide_alias(
    new_dice: float, new_tags: dict, champion, *, promote: bool = True
) -> tuple[str, str]:
    """`champion` if `new_dice` strictly beats the champion's under the same validation
    protocol (a tie never moves it), else `challenger`; the reason in one line.

    A champion with no recorded protocol (registered before protocols were) is never beaten
    automatically: its score may come from other cases or settings, so the new version is
    `challenger` and a person decides (`tsesnet models promote`).

    Args:
        new_dice: the new version's validation Dice, at full precision.
        new_tags: the new version's protocol tags (`ValidationProtocol.tags`); without
            `protocol` its protocol is unknown.
        champion: the current champion `ModelVersion`, or None.
        promote: False for a sweep's best trial: it registers as `challenger` whatever the
            gate says, and the reason says what the gate would have done.

    Returns:
        (alias, a sentence saying why).
    """
    alias, reason = _gate(new_dice, new_tags, champion)
    if alias == CHAMPION and not promote:
        return CHALLENGER, (
            f"a sweep registers its best as @challenger unless run with --promote (the gate "
            f"would have made it @champion: {reason})"
        )
    return alias, reason


def _gate(new_dice: float, new_tags: dict, champion) -> tuple[str, str]:
    if champion is None:
        return CHAMPION, "no champion yet"
    tags = champion.tags or {}
    old_p, new_p = protocol.of_tags(tags), protocol.of_tags(new_tags)
    hand = "promote by hand (tsesnet models promote) if the scores are comparable"
    if old_p == protocol.UNKNOWN:
        return CHALLENGER, (
            f"champion v{champion.version} has no recorded validation protocol (registered "
            f"before protocols were), so its val Dice is not comparable; {hand}"
        )
    if new_p == protocol.UNKNOWN:
        return CHALLENGER, f"this version has no recorded validation protocol; {hand}"
    if old_p != new_p:
        what = protocol.differences(new_tags, tags) or "other settings"
        reason = (
            f"champion v{champion.version} was validated under another protocol ({old_p[:8]}; "
            f"this version {new_p[:8]}: {what}), so the scores are not comparable; {hand}"
        )
        if tags.get("store_fingerprint") != new_tags.get("store_fingerprint"):
            # A store indexed before fingerprint version 2 (data_store.index) gets a new
            # fingerprint when it is next written, although its data may be the same: say so.
            reason += (
                "; a store re-indexed since fingerprints cover folds and case attributes "
                "(version 2) has a new fingerprint for the same data"
            )
        return CHALLENGER, reason
    old, new = _old_dice(tags.get("val_dice"), new_dice)
    a, b = _as_distinct_text(new, old)
    if old != old or new > old:  # NaN: a champion without a score loses
        return CHAMPION, f"val Dice {a} beats champion v{champion.version} ({b}), same protocol"
    verb = "ties" if new == old else "does not beat"
    return CHALLENGER, f"val Dice {a} {verb} champion v{champion.version} ({b}), same protocol"


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
    training_record: TrainingRecord | None = None,
    val_hd95: float | None = None,
    val_sensitivity: float | None = None,
    validation: protocol.ValidationProtocol | None = None,
    promote: bool = True,
    check_stop=None,
) -> Registration:
    """Log the weights as an MLflow model in `run_id`, register it and set its alias.

    All or nothing: the version is created with its tags marked pending, and if anything
    fails or `check_stop` raises before the registration is done, the version is deleted again
    (an alias already moved goes back first), or, where the server refuses even that, left
    marked `failed` and never aliased.

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
        training_record: what the training cases looked like, stored for prediction to warn
            about unlike scans (`tsesnet.common.training_record`); None when unknown.
        val_hd95: mean validation HD95 (mm) at the same epoch, for the description.
        val_sensitivity: mean validation sensitivity at the same epoch.
        validation: how `val_dice` was measured; None: unknown (never takes @champion from
            a champion).
        promote: False registers as challenger whatever the gate says (a sweep's best).
        check_stop: called before the alias moves and once more when all is set; whatever it
            raises (a signal's `KeyboardInterrupt`) withdraws the version and propagates.
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
        RECORD_KEY: None if training_record is None else training_record.as_json(),
        "validation_protocol": None if validation is None else validation.as_dict(),
    }
    info = _log_model(run_id, weights, cfg)
    scores = {"val_dice": val_dice, "val_hd95": val_hd95, "val_sensitivity": val_sensitivity}
    tags = {
        **{k: "" if v is None else repr(float(v)) for k, v in scores.items()},
        "min_component_fraction": f"{float(min_component_fraction):g}",
        "run_id": run_id,
        **{k: str(v) for k, v in lineage.items()},
        **({} if validation is None else validation.tags()),
        "preset": str(model_config.get("preset")),
        "fusion": str(model_config["fusion"]),
    }
    return _register_gated(mlc, info.model_uri, name, tags, promote, check_stop or (lambda: None))


# The alias gate. A version is created with GATE_TAG "pending" (in the same request, so that no
# one sees it untagged) and decides its alias only when every lower version of the model is no
# longer pending: the registry's version numbers, which the backend hands out one at a time, are
# the tickets of a ticket lock. That holds on SQLite and on a tracking server alike (MLflow has no
# lock or compare-and-set of its own). A pending version whose registering process is gone (same
# host, pid dead) or that has not changed for GATE_STALE_S is marked "abandoned" and skipped.
GATE_TAG, HOLDER_TAG, BEAT_TAG = "tsesnet.gate", "tsesnet.gate_holder", "tsesnet.gate_beat"
PENDING, DONE, FAILED, ABANDONED = "pending", "done", "failed", "abandoned"
GATE_STALE_S = 120.0
_POLL_S = 0.25


def _register_gated(mlc, model_uri, name, tags, promote, check_stop) -> Registration:
    import os
    import socket

    import mlflow

    _describe_model(mlc, name)
    holder = f"{socket.gethostname()} pid {os.getpid()}"
    mv = mlflow.register_model(
        model_uri, name, tags={**tags, GATE_TAG: PENDING, HOLDER_TAG: holder, BEAT_TAG: "0"}
    )
    version, moved = str(mv.version), None
    try:
        _wait_turn(mlc, name, version)
        champion = _champion(mlc, name)
        alias, reason = decide_alias(float(tags["val_dice"]), tags, champion, promote=promote)
        decided = {**tags, "registered_as": alias, "registration_reason": reason}
        # what happened at registration; the alias itself may move later (`tsesnet models`)
        mlc.set_model_version_tag(name, version, "registered_as", alias)
        mlc.set_model_version_tag(name, version, "registration_reason", reason)
        mlc.update_model_version(name, version, description=_version_description(decided))
        check_stop()
        if mlc.get_model_version(name, version).tags.get(GATE_TAG) != PENDING:
            raise InputError(
                f"not registered: version {version} of {name} was marked abandoned by another "
                f"registration after {GATE_STALE_S:g} s without progress"
            )
        before = _holder(mlc, name, alias)
        mlc.set_registered_model_alias(name, alias, version)
        moved = (alias, _version_of(before))
        if alias == CHAMPION and before and str(before.version) != version:
            _record_loss(mlc, before, version, reason)
        mlc.set_tag(tags["run_id"], "tsesnet.model_version", version)
        check_stop()
        mlc.set_model_version_tag(name, version, GATE_TAG, DONE)
    except BaseException as err:
        _withdraw(mlc, name, version, moved, f"{type(err).__name__}: {err}".rstrip(": "))
        raise
    return Registration(
        name, version, alias, f"models:/{name}/{version}", reason, replaced=_version_of(before)
    )


def _holder(mlc, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlc.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _version_of(mv) -> str | None:
    return None if mv is None else str(mv.version)


def _wait_turn(mlc, name: str, version: str) -> None:
    """Return once no lower version of `name` is pending, saying once whom it waits for."""
    import time

    seen: dict[str, tuple[object, float]] = {}  # version -> (its state, since when unchanged)
    said, beats = False, 0
    while True:
        waiting = []
        query = f"name = {quote_name(name)} and tags.`{GATE_TAG}` = '{PENDING}'"
        for v in mlc.search_model_versions(query):
            t = v.tags or {}
            if int(v.version) >= int(version) or t.get(GATE_TAG) != PENDING:
                continue
            state = (tuple(sorted(t.items())), v.description)
            if seen.get(v.version, (None,))[0] != state:
                seen[v.version] = (state, time.monotonic())
            if _abandoned(t, time.monotonic() - seen[v.version][1]):
                _mark(mlc, name, str(v.version), ABANDONED,
                      f"its registering process ({t.get(HOLDER_TAG, '?')}) is gone or made no "
                      f"progress for {GATE_STALE_S:g} s; never aliased")  # fmt: skip
                continue
            waiting.append(v)
        if not waiting:
            return
        if not said:
            first = min(waiting, key=lambda v: int(v.version))
            print(
                f"registering {name} version {version}: waiting for version {first.version} "
                f"({first.tags.get(HOLDER_TAG, '?')}) to be registered first",
                flush=True,
            )
            said = True
        beats += 1  # a waiting registration is alive: others must not take it for abandoned
        mlc.set_model_version_tag(name, version, BEAT_TAG, str(beats))
        time.sleep(_POLL_S)


def _abandoned(tags: dict, unchanged_s: float) -> bool:
    """Whether a pending version's registration is gone: its process was on this host and is
    not running, or nothing about it changed for `GATE_STALE_S`."""
    import socket

    from data_store.location import pid_running

    host, _, pid = tags.get(HOLDER_TAG, "").rpartition(" pid ")
    if host == socket.gethostname() and pid.isdigit() and not pid_running(int(pid)):
        return True
    return unchanged_s > GATE_STALE_S


def _mark(mlc, name: str, version: str, state: str, why: str) -> None:
    mv = mlc.get_model_version(name, version)
    mlc.set_model_version_tag(name, version, GATE_TAG, state)
    line = f"Registration {state}: {why}."
    mlc.update_model_version(
        name, version, description=f"{mv.description}\n\n{line}" if mv.description else line
    )


def _withdraw(mlc, name: str, version: str, moved, why: str) -> None:
    """Undo a registration that did not finish: the alias back where it was (`moved`: (alias,
    the version that held it before or None)), the version deleted (or, if the backend
    refuses, marked failed); never raises."""
    import sys

    try:
        if moved is not None:
            alias, before = moved
            if before is not None and before != version:
                mlc.set_registered_model_alias(name, alias, before)
                if alias == CHAMPION:
                    _unrecord_loss(mlc, name, before, version)
            else:
                mlc.delete_registered_model_alias(name, alias)
        mlc.delete_model_version(name, version)
        print(f"registration of {name} version {version} withdrawn ({why})", flush=True)
        return
    except Exception as undo_err:  # the backend may be what failed: mark what can be marked
        first = (
            f"{type(undo_err).__name__}: {str(undo_err).splitlines()[0] if str(undo_err) else ''}"
        )
    with contextlib.suppress(Exception):  # nothing more can be done; the gate skips it later
        _mark(mlc, name, version, FAILED, f"interrupted ({why}); withdrawing it failed: {first}")
    print(
        f"warning: {name} version {version} was not registered completely ({why}) and could "
        f"not be withdrawn ({first}); it stays marked {GATE_TAG}={PENDING} or {FAILED} and is "
        "never aliased by the gate; delete it in the MLflow UI",
        file=sys.stderr,
        flush=True,
    )


def _record_loss(mlc, old, winner: str, reason: str) -> None:
    """On the version that lost @champion to a registration: by which version, when, why."""
    import datetime

    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for key, value in (("to", winner), ("at", when), ("reason", reason)):
        mlc.set_model_version_tag(old.name, old.version, f"demoted_champion_{key}", value)
    mlc.set_model_version_tag(
        old.name, old.version, "demoted_champion_by", f"registration of v{winner}"
    )
    line = f"{when}: @champion moved from here to v{winner} at its registration: {reason}."
    text = f"{old.description}\n\n{line}" if old.description else line
    mlc.update_model_version(old.name, old.version, description=text)


def _unrecord_loss(mlc, name: str, old: str, winner: str) -> None:
    """Undo `_record_loss` of version `old` for `winner`: its tags and description line."""
    mv = mlc.get_model_version(name, old)
    if (mv.tags or {}).get("demoted_champion_to") != winner:
        return
    for key in ("to", "at", "reason", "by"):
        mlc.delete_model_version_tag(name, old, f"demoted_champion_{key}")
    mark = f"@champion moved from here to v{winner} at its registration"
    paragraphs = (mv.description or "").split("\n\n")
    kept = [p for p in paragraphs if mark not in p]
    mlc.update_model_version(name, old, description="\n\n".join(kept))


def withdraw(reg: Registration, why: str = "interrupted") -> None:
    """Undo a finished registration (a signal came before its run ended): the alias back on
    the version that held it, if no one moved it since, and the version deleted."""
    mlc = client()
    holder = _holder(mlc, reg.name, reg.alias) if reg.alias else None
    moved = None
    if holder is not None and str(holder.version) == reg.version:
        moved = (reg.alias, reg.replaced)
    _withdraw(mlc, reg.name, reg.version, moved, why)


MODEL_DESCRIPTION = (
    "TSESNet segmentation models for breast tumours in 4D DCE-MRI, registered by the tsesnet "
    "platform. Every training run (and the best trial of every sweep) registers its best "
    "checkpoint as a new version. The alias @champion moves to a new version only when its "
    "validation Dice strictly beats the champion's under the same validation protocol (store "
    "fingerprint, fold, validation cases, sliding window and overlap, post-processing: the "
    "version tag `protocol` and `protocol.*`); otherwise the new version is @challenger and its "
    "tag `registration_reason` says why. A sweep's best registers as @challenger unless run "
    "with --promote. `tsesnet models promote NAME VERSION --alias A --reason TEXT` "
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
    sens = f", sensitivity {float(t['val_sensitivity']):.4f}" if t.get("val_sensitivity") else ""
    cases = t.get("protocol.n_val_cases", "?")
    lines = [
        f"TSESNet {t['preset']}/{t['fusion']}: validation DSC {float(t['val_dice']):.4f}{hd95}"
        f"{sens} on {cases} case(s) of fold {t.get('fold', '?')} of store {t.get('store', '?')} "
        f"(fingerprint {t.get('store_fingerprint', '?')}); validation protocol "
        f"{protocol.of_tags(t)} (window {t.get('protocol.window', '?')}, overlap "
        f"{t.get('protocol.overlap', '?')}).",
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
            f"{{model_uri}} must name exactly one model, but this folder holds {len(found)} "
            f"(folders with {CONFIG_FILE} or {WEIGHTS_FILE}: {shown}); pass one of them",
            path=uri,
            params=["model_uri"],
        )
    return complete[0]


def model_config_dict(model) -> dict:
    """The JSON-able `ModelConfig` of a built network (what `log_and_register` stores)."""
    return dataclasses.asdict(model.config)


def quote_name(name: str) -> str:
    """A registered model name as an MLflow search literal."""
    from tsesnet.tracking.runs import quote

    return quote(name)
