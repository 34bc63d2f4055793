"""Hyper-parameter sweeps: the search space (space.py), the trial a training run reports to
(trial.py) and the Optuna study (study.py). flows/sweep_flow.py runs them; docs/sweeps.md."""
