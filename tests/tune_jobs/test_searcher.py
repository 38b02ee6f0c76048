"""HonestOptunaSearch against a real SQLite Optuna storage (no Ray cluster needed)."""

from __future__ import annotations

from pathlib import Path

import optuna
import optuna.distributions as od

from tune_jobs.searcher import HonestOptunaSearch, ShuffledGridSampler

T = optuna.trial.TrialState


def _searcher(db: Path) -> HonestOptunaSearch:
    return HonestOptunaSearch(
        space={"trial.resolution": od.CategoricalDistribution([32, 64])}, metric="objective", mode="min",
        sampler=optuna.samplers.RandomSampler(seed=0), study_name="s",
        storage=optuna.storages.RDBStorage(f"sqlite:///{db}"),
    )


def test_states_told_honestly(tmp_path: Path) -> None:
    s = _searcher(tmp_path / "o.db")
    for tid in ("full", "stopped", "error"):
        assert "trial.resolution" in s.suggest(tid)["overrides"]  # type: ignore[index]
        s.on_trial_result(tid, {"objective": 0.1, "training_iteration": 1, "epoch": 5.0})  # eval_every 5
    s.on_trial_complete("full", {"objective": 0.2, "epoch": 3, "epochs": 3})
    s.on_trial_complete("stopped", {"objective": 0.01, "epoch": 1, "epochs": 3})  # ASHA-stopped
    s.on_trial_complete("error", {"objective": 0.05, "epoch": 2, "epochs": 3}, error=True)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert [t.state for t in study.trials] == [T.COMPLETE, T.PRUNED, T.FAIL]
    assert study.trials[0].value == 0.2 and study.trials[1].intermediate_values == {5: 0.1}  # by epoch


def test_restore_fails_only_orphans(tmp_path: Path) -> None:
    s = _searcher(tmp_path / "o.db")
    s.suggest("known")
    s.save(str(tmp_path / "snap.pkl"))  # the searcher's last snapshot
    s.suggest("orphan")  # handed out after it, then the driver is killed
    restored = _searcher(tmp_path / "o.db")
    restored.restore(str(tmp_path / "snap.pkl"))
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert [t.state for t in study.trials] == [T.RUNNING, T.FAIL]
    restored.on_trial_complete("known", {"objective": 0.3, "epoch": 2, "epochs": 2})
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert [t.state for t in study.trials] == [T.COMPLETE, T.FAIL]


def test_shuffled_grid_ends_without_stop() -> None:
    """Tune tells the study outside study.optimize: Optuna's GridSampler then raises from study.stop() after the
    last grid point (Tune printed it as a warning); ShuffledGridSampler visits every point once and ends quietly."""
    grid = {"trial.resolution": [64, 80]}
    for sampler, raises in ((optuna.samplers.GridSampler(grid, seed=0), True), (ShuffledGridSampler(grid, seed=0), False)):
        study = optuna.create_study(sampler=sampler)
        seen, errors = [], []
        for _ in range(2):
            t = study.ask()
            seen.append(t.suggest_categorical("trial.resolution", [64, 80]))
            try:
                study.tell(t, 0.5)
            except RuntimeError as e:
                errors.append(str(e))
        assert sorted(seen) == [64, 80]
        assert [x.state for x in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
        assert bool(errors) is raises and all("Study.stop" in e for e in errors)
