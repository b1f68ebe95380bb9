"""Hyper-parameter sweeps over the loss weights, temperature and fusion strategy (Ray Tune + Optuna)."""
