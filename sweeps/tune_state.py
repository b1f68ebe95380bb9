"""How many trials a Tune experiment on disk will propose, and proposing more on `--resume`.

Tune keeps the searcher's trial budget in its saved state, not in anything `Tuner.restore`
takes: Optuna's TPE behind a `SearchGenerator` (`search_gen_state-*.json`: `total_samples`,
`counter`, `finished`) and random search's `BasicVariantGenerator`
(`basic-variant-state-*.json`: `_total_samples` and a trial iterator with `num_samples_left`).
Both are cloudpickled dicts, written atomically by Tune (`ray.tune.utils.util._atomic_save`);
this module reads and rewrites the newest one the same way. It is the only code that knows these
files; the project pins Ray to 2.60.x and `tests/test_sweep.py` resumes a real sweep with more
trials, so a change of format fails a test, not a user's sweep.
"""

from __future__ import annotations

import glob
import os
import uuid
from pathlib import Path

TPE_STATE, RANDOM_STATE = "search_gen_state-*.json", "basic-variant-state-*.json"


def _newest(exp_path: str) -> tuple[str, str] | None:
    for pattern in (TPE_STATE, RANDOM_STATE):
        found = glob.glob(os.path.join(exp_path, pattern))
        if found:
            return max(found), pattern
    return None


def _load(path: str) -> dict:
    import ray.cloudpickle as cloudpickle

    with open(path, "rb") as f:
        return cloudpickle.load(f)


def planned_trials(exp_path: str) -> int | None:
    """The number of trials the saved experiment's searcher proposes in all (None: unknown)."""
    found = _newest(exp_path)
    if found is None:
        return None
    state = _load(found[0])
    return int(state["total_samples"] if found[1] == TPE_STATE else state["_total_samples"])


def extend_trials(exp_path: str, trials: int) -> None:
    """Raise the saved searcher's trial budget to `trials` (more than it has), so that the
    restored experiment proposes the extra ones."""
    import ray.cloudpickle as cloudpickle

    path, pattern = _newest(exp_path)
    state = _load(path)
    if pattern == TPE_STATE:
        state["total_samples"], state["finished"] = trials, False
    else:
        extra = trials - state["_total_samples"]
        last = state["_iterators"][-1]
        last.num_samples += extra
        last.num_samples_left += extra
        state["_total_samples"], state["_finished"] = trials, False
    tmp = Path(path).with_name(f".{uuid.uuid4()}-{Path(path).name}")
    with open(tmp, "wb") as f:
        cloudpickle.dump(state, f)
    os.replace(tmp, path)
