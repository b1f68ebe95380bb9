"""Hyper-parameter sweeps over loss weights, temperature and fusion (Ray Tune + Optuna)."""
