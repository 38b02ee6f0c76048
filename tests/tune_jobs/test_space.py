from __future__ import annotations

import optuna.distributions as od
import pytest

from pqfn.config import validate
from pqfn.errors import ConfigError
from tune_jobs.space import grid_points, optuna_space


def test_optuna_space_from_yaml_block() -> None:
    cfg = validate({"search": {"space": {
        "trial.resolution": {"choice": [32, 64]}, "trial.optimizer.lr": {"loguniform": [1e-4, 1e-2]},
        "trial.label_smoothing": {"uniform": [0, 0.2]}, "trial.epochs": {"randint": [2, 5]}}}}, "t.yaml")
    sp = optuna_space(cfg.search)
    assert sp["trial.resolution"] == od.CategoricalDistribution([32, 64])
    assert sp["trial.optimizer.lr"] == od.FloatDistribution(1e-4, 1e-2, log=True)
    assert sp["trial.label_smoothing"] == od.FloatDistribution(0, 0.2)
    assert sp["trial.epochs"] == od.IntDistribution(2, 5)


def test_grid_product_and_one_axis_at_a_time() -> None:
    cfg = validate({"search": {"type": "grid", "space": {"trial.resolution": {"choice": [32, 64]},
                                                         "trial.batch_size": {"choice": [8, 16, 32]}}}}, "t.yaml")
    assert len(grid_points(cfg)) == 6
    cfg = validate({"trial": {"data_size": 840, "resolution": 100, "batch_size": 8},
                    "search": {"type": "grid", "axes": [{"trial.data_size": [420, 840]},
                                                        {"trial.resolution": [32, 100]},
                                                        {"trial.batch_size": [8, 16]}]}}, "t.yaml")
    pts = grid_points(cfg)
    centre = {"trial.data_size": 840, "trial.resolution": 100, "trial.batch_size": 8}
    assert pts.count(centre) == 1 and len(pts) == 4  # the centre once, then one change per axis
    assert all(sum(p[k] != centre[k] for k in centre) <= 1 for p in pts)


def test_grid_needs_choices() -> None:
    cfg = validate({"search": {"type": "grid", "space": {"trial.optimizer.lr": {"uniform": [0.1, 0.2]}}}}, "t.yaml")
    with pytest.raises(ConfigError, match="grid search needs choice axes"):
        grid_points(cfg)
    with pytest.raises(ConfigError, match="axes"):
        validate({"search": {"type": "optuna", "axes": [{"trial.resolution": [32]}]}}, "t.yaml")
