"""Hyperparameter and architecture search: a candidate's ``search`` section run as Optuna
trials, each a candidate run on the executor (``driver``: the driver's side; ``trial``:
a worker's; ``space``: the section in Optuna's terms)."""
