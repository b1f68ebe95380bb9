"""Training on Ray Train: the config (`config`), the driver (`driver`: plan, fit, register), the
per-worker loop (`worker`), validation (`validation`) and the checkpoint format (`checkpoint`)."""
