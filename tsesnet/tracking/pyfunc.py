"""The MLflow "models from code" pyfunc of a registered TSESNet (`mlflow.pyfunc.load_model`).

MLflow stores this file as source text with the model and runs it when the model is loaded as a
pyfunc; nothing is unpickled. It is not imported by the package:
`tsesnet.tracking.registry.load_model` is the way the platform loads models, and needs no pyfunc.

`predict` takes a (B, T, Z, Y, X) float32 volume, intensity-normalised like the store's
(`data_store.normalize.normalize_intensity`), and returns sliding-window logits (B, 1, Z, Y, X).
The `tsesnet` package must be importable where the pyfunc is loaded.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class TSESNetPyfunc(PythonModel):
    """Sliding-window prediction with the weights and config logged next to this file."""

    def load_context(self, context):
        from tsesnet.tracking.registry import load_model_files

        self.loaded = load_model_files(context.artifacts["weights"], context.artifacts["config"])

    # np.ndarray is a hint MLflow infers no schema from: the model's explicit signature stays the
    # contract (without a hint MLflow advises adding one, twice per registration).
    def predict(self, context, model_input: np.ndarray, params=None):
        import torch

        from tsesnet.inference import sliding_window_inference

        if isinstance(model_input, dict):  # a named-tensor request: {"volume": array}
            (model_input,) = model_input.values()
        x = torch.from_numpy(np.asarray(model_input, dtype=np.float32))  # (B, T, Z, Y, X)
        logits = sliding_window_inference(self.loaded.model, x, patch=self.loaded.patch)
        return logits.numpy()  # (B, 1, Z, Y, X)


# Models from code: MLflow picks up the model this file defines when it runs the file.
mlflow.models.set_model(TSESNetPyfunc())
