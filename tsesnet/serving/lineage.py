"""Which model made a prediction, and with what: what `tsesnet predict` prints before it starts
and records in `OUT/prediction.json` beside the masks.

A registry URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) is resolved once, on the driver,
to the registered version it names *now* (an alias moves: `@champion` today may be another
version tomorrow), with the lineage training stored on that version (its run, the training
store's fingerprint, the commit). A local model folder gives the lineage kept in its
`model_config.json`. `prediction.json` then says what was run: the model, the input, the
settings, each case's status and warnings, the software versions and the time.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from data_store.errors import InputError

PREDICTION_FILE = "prediction.json"


@dataclass(frozen=True)
class ModelInfo:
    """The model a prediction used (None: not known for this kind of URI).

    Attributes:
        uri: as given to `--model`.
        name: registered model name.
        version: registered version the URI resolved to.
        alias: the alias named in the URI (`champion` for `models:/NAME@champion`).
        run_id: the MLflow run that trained it.
        run_name: that run's name.
        store_fingerprint: content fingerprint of the store it was trained on.
        fold: its validation fold.
        git_commit: the commit of the code that trained it.
    """

    uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    run_name: str | None = None
    store_fingerprint: str | None = None
    fold: str | None = None
    git_commit: str | None = None

    def lines(self) -> list[str]:
        """What `predict` prints before it starts: one line per fact known."""
        head = self.uri
        if self.version is not None:
            alias = f" (@{self.alias})" if self.alias else ""
            head = f"{self.name} version {self.version}{alias}  [{self.uri}]"
        facts = [
            ("run", self._run()),
            ("trained on store fingerprint", self.store_fingerprint),
            ("fold", self.fold),
            ("commit", self.git_commit),
        ]
        return [f"model: {head}"] + [f"  {k}: {v}" for k, v in facts if v not in (None, "")]

    def _run(self) -> str | None:
        if self.run_id and self.run_name:
            return f"{self.run_id} ({self.run_name})"
        return self.run_id or self.run_name

    def to_json(self) -> dict:
        return asdict(self)


def resolve_model(uri: str) -> ModelInfo:
    """The version and lineage `uri` names now.

    Raises:
        InputError: a registry URI that does not resolve, or a folder that is not one model.
    """
    if Path(uri).is_dir():
        return _from_folder(uri)
    if not uri.startswith("models:/"):
        return ModelInfo(uri=uri)
    from mlflow.exceptions import MlflowException

    from tsesnet.tracking.registry import client

    mlc = client()
    name, sep, alias = uri[len("models:/") :].partition("@")
    try:
        if sep:
            mv = mlc.get_model_version_by_alias(name, alias)
        elif "/" in name and name.split("/", 1)[1].isdigit():
            name, version = name.split("/", 1)
            mv = mlc.get_model_version(name, version)
        else:  # a logged model's `models:/m-...`: no registered version
            return ModelInfo(uri=uri)
    except MlflowException as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"cannot load model {uri}: {first}") from err
    tags = mv.tags or {}
    return ModelInfo(
        uri=uri,
        name=name,
        version=str(mv.version),
        alias=alias or None,
        run_id=mv.run_id or tags.get("run_id"),
        run_name=tags.get("run_name"),
        store_fingerprint=tags.get("store_fingerprint"),
        fold=tags.get("fold"),
        git_commit=tags.get("git_commit"),
    )


def _from_folder(uri: str) -> ModelInfo:
    from tsesnet.tracking.registry import CONFIG_FILE, check_one_model

    folder = check_one_model(Path(uri), uri)
    try:
        lineage = json.loads((folder / CONFIG_FILE).read_text()).get("lineage") or {}
    except (OSError, ValueError, AttributeError):
        lineage = {}
    return ModelInfo(
        uri=uri,
        run_name=_text(lineage.get("run_name")),
        store_fingerprint=_text(lineage.get("store_fingerprint")),
        fold=_text(lineage.get("fold")),
        git_commit=_text(lineage.get("git_commit")),
    )


def _text(v) -> str | None:
    return None if v is None else str(v)


def software_versions() -> dict[str, str]:
    """Versions of what computed the masks."""
    import mlflow
    import numpy
    import ray
    import torch

    import tsesnet

    return {
        "tsesnet": tsesnet.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
        "numpy": numpy.__version__,
    }


def read_prediction_record(folder) -> dict | None:
    """`folder/prediction.json` as written by `predict`, or None if there is none (or it is not
    JSON: an old or foreign folder is still evaluated)."""
    from tsesnet.serving.outputs import is_url, object_fs

    try:
        if is_url(folder):
            fs, root = object_fs(str(folder))
            text = fs.cat_file(f"{root.rstrip('/')}/{PREDICTION_FILE}").decode()
        else:
            text = (Path(folder) / PREDICTION_FILE).read_text()
        record = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def model_line(record: dict) -> str | None:
    """`model: NAME version V (@ALIAS) [URI]` from a prediction record, None without one."""
    model = record.get("model")
    if not isinstance(model, dict) or not model.get("uri"):
        return None
    known = {k: model.get(k) for k in ModelInfo.__dataclass_fields__}
    return ModelInfo(**known).lines()[0]
