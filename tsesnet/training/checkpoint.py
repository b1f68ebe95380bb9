"""The checkpoint format: the only module that knows its file names.

A checkpoint directory (one per reported epoch, under `run.storage_path/<run name>/`) holds:

    model.pt     state_dict of the unwrapped module (never DDP- or compile-wrapped)
    optim.pt     the optimizer's state_dict
    best.pt      state_dict of the best weights so far (by validation Dice)
    state.json   `TrainState`: epoch, best epoch and Dice, history, the chosen component filter

All `.pt` files are plain tensors, loaded with `torch.load(weights_only=True)`. Next to the
checkpoints, the run folder holds `tsesnet_run.json` (`claim_run_folder`): the model config and
store fingerprint of the run's first start, so a rerun of the same name resumes only the same
model on the same store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_store.errors import InputError

MODEL_FILE, OPTIM_FILE, BEST_FILE, STATE_FILE = "model.pt", "optim.pt", "best.pt", "state.json"
RUN_FILE = "tsesnet_run.json"


@dataclass
class TrainState:
    """What a run carries across epochs, restarts and resumes (`state.json`).

    Attributes:
        epoch: the last finished epoch, 0-based (-1 before the first).
        best_val_dice: the best validation Dice so far (-1 before the first validation).
        best_epoch: the epoch of `best_val_dice` (-1 before the first validation).
        history: one dict of numeric metrics per finished epoch.
        stopped_early: early stopping ended the run.
        phases: the phase count T of the training patches.
        restarts: how many times the run restarted from a checkpoint.
        min_component_fraction: the connected-component filter chosen at the best epoch.
        val_dice_filtered: validation Dice with that filter (None: as `best_val_dice`).
    """

    epoch: int = -1
    best_val_dice: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    phases: int | None = None
    restarts: int = 0
    min_component_fraction: float = 0.0
    val_dice_filtered: float | None = None

    @property
    def filtered_dice(self) -> float:
        """Validation Dice with the chosen filter (the raw Dice when none was chosen)."""
        return self.best_val_dice if self.val_dice_filtered is None else self.val_dice_filtered

    @classmethod
    def from_json(cls, text: str, where: str = STATE_FILE) -> TrainState:
        """Parse `state.json` (keys of older releases that are absent take their defaults)."""
        try:
            data = json.loads(text)
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError, AttributeError) as err:
            raise InputError(f"not a training state: {err}", path=where) from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def save(directory: str | Path, module, optimizer, best_weights: dict, state: TrainState) -> None:
    """Write a checkpoint of `module` (unwrapped), `optimizer`, the best weights and the state."""
    d = Path(directory)
    torch.save(module.state_dict(), d / MODEL_FILE)
    torch.save(optimizer.state_dict(), d / OPTIM_FILE)
    torch.save(best_weights, d / BEST_FILE)
    (d / STATE_FILE).write_text(state.to_json())


def restore(directory: str | Path, module, optimizer) -> tuple[TrainState, dict]:
    """Load model and optimizer in place from a checkpoint; return (state, best weights)."""
    d = Path(directory)
    module.load_state_dict(_load(d / MODEL_FILE))
    optimizer.load_state_dict(_load(d / OPTIM_FILE))
    return read_state(d), load_best(d)


@contextlib.contextmanager
def local_directory(ckpt):
    """A Ray `Checkpoint` as a local folder of this process's own, for the block's duration.

    A checkpoint on local disk is read where it is. One on remote storage (S3) is downloaded to
    a private temporary folder. Ray's `Checkpoint.as_directory()` shares one download folder
    among the processes of a node, and a process that arrives after the first download ended
    downloads again over the files the first is reading: two workers restoring on one node then
    read a torn `optim.pt` ("PytorchStreamReader failed reading file"), seen in the cluster
    rehearsal after a lost node.
    """
    import pyarrow.fs

    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        yield ckpt.path
        return
    with tempfile.TemporaryDirectory(prefix="tsesnet-checkpoint-") as d:
        yield ckpt.to_directory(d)


def read_state(directory: str | Path) -> TrainState:
    """The `TrainState` of a checkpoint directory."""
    path = Path(directory) / STATE_FILE
    return TrainState.from_json(path.read_text(), str(path))


def load_best(directory: str | Path) -> dict:
    """The best weights (a state_dict on CPU) of a checkpoint directory."""
    return _load(Path(directory) / BEST_FILE)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def claim_run_folder(storage_path: str, name: str, model_config: dict, fingerprint: str) -> bool:
    """Refuse to resume run `name` from checkpoints of another model or store.

    The first run of a name writes `RUN_FILE` (the model config and the store fingerprint) next
    to its checkpoints; a later run of the same name must match it. Everything else (epochs,
    learning rate, workers) may change on resume.

    Returns:
        Whether Ray Train will resume: it has registered a checkpoint of this run (its
        checkpoint manager's snapshot exists; a checkpoint folder alone, written by a run killed
        before Ray registered it, is not resumed from).

    Raises:
        InputError: naming the run, the folder and what differs.
    """
    import fsspec

    from tsesnet.model import upgrade_config

    fs, root = fsspec.core.url_to_fs(f"{storage_path}/{name}")
    path = f"{root}/{RUN_FILE}"
    mine = json.loads(json.dumps({"model": model_config, "store_fingerprint": fingerprint}))
    if not fs.exists(path):
        fs.makedirs(root, exist_ok=True)
        with fs.open(path, "w") as f:
            json.dump(mine, f, indent=1)
        return False
    with fs.open(path) as f:
        theirs = json.load(f)
    old_model = upgrade_config(theirs.get("model", {}))
    differ = [
        f"model.{k} {old_model.get(k)!r} -> {model_config.get(k)!r}"
        for k in sorted(set(mine["model"]) | set(old_model))
        if mine["model"].get(k) != old_model.get(k)
    ]
    if theirs.get("store_fingerprint") != fingerprint:
        differ.append(f"store fingerprint {theirs.get('store_fingerprint')} -> {fingerprint}")
    if differ:
        raise InputError(
            f"run {name} cannot resume: its checkpoints are for another model or store "
            f"({'; '.join(differ)}); choose another {{name}} or delete this folder",
            path=f"{storage_path}/{name}",
            params=["name"],
        )
    from tsesnet.compat import train_snapshot_filename

    return fs.exists(f"{root}/{train_snapshot_filename()}")
