"""`tsesnet.registry`: the documented import path of the model registry (`load_model`).

The registry lives in `tsesnet.tracking.registry`; this name stays because users import it and
because every model registered before the move stores a pyfunc (`tsesnet/tracking/pyfunc.py`, as
text) that imports `load_model_files` from here.
"""

from tsesnet.tracking.registry import LoadedModel, load_model, load_model_files

__all__ = ["LoadedModel", "load_model", "load_model_files"]
