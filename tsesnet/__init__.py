"""TSESNet: temporal-spatial enhanced segmentation of breast tumours in 4D DCE-MRI.

`tsesnet.model`, `tsesnet.losses`, `tsesnet.metrics` and `tsesnet.inference` are pure PyTorch;
the rest of the package (training, registry, prediction, the command line) drives them on Ray
and MLflow.
"""

__version__ = "0.1.0"
