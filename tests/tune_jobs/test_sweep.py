"""Real tiny sweeps on a real local Ray instance with OptunaSearch and an SQLite storage (the journal
storage of resources.shared_storage is exercised by test_resume)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import optuna
import pytest

from pqfn.config import DataConfig, load_config
from pqfn.data import Dataset
from pqfn.errors import PqfnError
from pqfn.records import COMPLETED
from pqfn.report import read_trials_csv
from pqfn.selection import select
from tests.tune_jobs.conftest import sweep_yaml
from tune_jobs.sweep import run_sweep, study_storage

pytestmark = pytest.mark.slow


def _trials(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "trials.csv").open()))


def _study(run: Path) -> optuna.Study:
    state = json.loads((run / "sweep.json").read_text())
    cfg = load_config(run / "config.yaml")
    return optuna.load_study(study_name=state["study_name"], storage=study_storage(cfg, run))


def test_optuna_sweep_end_to_end(tmp_path: Path, tiny_data_cfg: DataConfig, tiny_ds: Dataset, ray_local: None) -> None:
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "opt", (
        "search:\n  num_samples: 3\n  max_concurrent: 2\n  n_startup_trials: 2\n"
        "  space: {trial.resolution: {choice: [32, 40]}, trial.optimizer.lr: {loguniform: [0.0005, 0.005]}}\n"
        "wandb: {mode: disabled}\n")))
    s = run_sweep(cfg, log=lambda *a: None)
    run = tmp_path / "runs/opt"
    rows = _trials(run)
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
    for r in rows:  # each trial's memory, split into its own and shared (the data set from the object store)
        assert 0 < float(r["mem/private_mb"]) < float(r["mem/rss_mb"]) and float(r["mem/shared_mb"]) > 0
        assert 0 < float(r["mem/object_store_mb"]) <= float(r["mem/shared_mb"])
    study = _study(run)
    assert len(study.trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted((t.params["trial.resolution"], round(t.params["trial.optimizer.lr"], 9)) for t in study.trials) == sorted(
        (int(r["trial.resolution"]), round(float(r["trial.optimizer.lr"]), 9)) for r in rows)
    # The selection is the rule of pqfn.selection applied to the trials as written (what `pqfn report` re-runs).
    sel = json.loads((run / "selection.json").read_text())
    again = select(read_trials_csv(run / "trials.csv"), cfg.selection)
    assert s.selection.selected is not None and again.selected is not None
    assert sel["selected"]["trial_id"] == s.selection.selected["trial_id"] == again.selected["trial_id"]
    assert s.evaluation is not None and s.evaluation["trial_id"] == s.selection.selected["trial_id"]
    assert s.evaluation["n_test_images"] > 0 and (run / "final/evaluation.json").exists()
    assert (run / "trials" / s.selection.selected["trial_id"] / "models.safetensors").exists()
    for f in ("config.yaml", "pareto.png", "gap_by_axis.png", "final/confusion.png", "tune"):
        assert (run / f).exists(), f
    # Every trial ended, so no Tune checkpoint is kept (each is ~3x a trial's models); the same command
    # again still reopens the finished sweep and names the same trial.
    assert not list((run / "tune").glob("*/checkpoint_*"))
    assert run_sweep(cfg, log=lambda *a: None).selection.selected["trial_id"] == s.selection.selected["trial_id"]  # type: ignore[index]
    # The same name with another config is refused; nothing already written changes.
    before = (run / "trials.csv").read_text()
    with pytest.raises(PqfnError, match="different config"):
        run_sweep(load_config(sweep_yaml(tmp_path, tiny_data_cfg, "opt", "search: {num_samples: 5}\n")), log=lambda *a: None)
    assert (run / "trials.csv").read_text() == before


def test_same_config_rerun_after_a_data_error_runs_every_trial(tmp_path: Path, tiny_data_cfg: DataConfig,
                                                                ray_local: None, capfd: pytest.CaptureFixture[str]) -> None:
    """The folder of a sweep that failed before Tune started (here: its data folder holds another synthetic
    set) is resumed by the same command once the data is fixed, and every trial runs. Before: Tune found
    the tuner.pkl it had just written, tried to restore, logged a traceback and ran one trial of three."""
    data = tmp_path / "other"
    data.mkdir()
    (data / "synth.json").write_text('{"seed": 99}')
    (data / "manifest.csv").write_text("path,label\n")
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "rerun", (
        "search:\n  num_samples: 3\n  max_concurrent: 2\n  n_startup_trials: 3\n"
        "  space: {trial.optimizer.lr: {loguniform: [0.0005, 0.005]}}\n"
        "evaluate: {enabled: false}\nwandb: {mode: disabled}\n")), [f"data.path={data}", "data.cache_dir=null",
                                                                     "trial.epochs=1"])
    with pytest.raises(PqfnError, match="synth.json differs"):
        run_sweep(cfg, log=lambda *a: None)
    shutil.rmtree(data)  # the fix: the synthetic set is generated anew
    logs: list[str] = []
    s = run_sweep(cfg, log=lambda *a: logs.append(" ".join(map(str, a))))
    assert not any("resuming" in x for x in logs), logs  # nothing to restore: a fresh start
    assert s.selection.counts[COMPLETED] == 3
    assert len(_trials(tmp_path / "runs/rerun")) == 3
    assert "Failed to restore" not in "".join(capfd.readouterr())


def test_failing_trial_does_not_stop_the_sweep(tmp_path: Path, tiny_data_cfg: DataConfig, ray_local: None) -> None:
    # lr 10 with SGD momentum 0.99 diverges to NaN: the trial engine raises, Tune records the failure.
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "fail", (
        "search:\n  type: grid\n  max_failures: 1\n  space: {trial.optimizer.lr: {choice: [0.002, 10.0]}}\n"
        "evaluate: {enabled: false}\nwandb: {mode: disabled}\n")), ["trial.optimizer.name=sgd", "trial.optimizer.momentum=0.99"])
    s = run_sweep(cfg, log=lambda *a: None)
    rows = {float(r["trial.optimizer.lr"]): r for r in _trials(tmp_path / "runs/fail")}
    assert rows[10.0]["status"] == "failed" and "trial stopped" in rows[10.0]["error"]
    assert rows[0.002]["status"] == "completed"
    assert s.selection.selected is not None and s.selection.selected["params"]["trial.optimizer.lr"] == 0.002
    assert s.evaluation is None  # evaluate.enabled: false


def test_asha_stopped_trials_are_pruned_and_never_selected(tmp_path: Path, tiny_data_cfg: DataConfig, ray_local: None) -> None:
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "asha", (
        "search:\n  num_samples: 5\n  max_concurrent: 1\n  n_startup_trials: 5\n"
        "  space: {trial.optimizer.lr: {loguniform: [0.00001, 0.01]}}\n"
        "  asha: {enabled: true, metric: val/loss, mode: min, grace_period: 1, reduction_factor: 2}\n"
        "evaluate: {enabled: false}\nwandb: {mode: disabled}\n")), ["trial.epochs=3"])
    s = run_sweep(cfg, log=lambda *a: None)
    run = tmp_path / "runs/asha"
    rows = _trials(run)
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial; the test needs one"
    assert all(int(r["epoch"]) < 3 for r in stopped)
    states = {round(t.params["trial.optimizer.lr"], 12): t.state for t in _study(run).trials}
    for r in stopped:
        assert states[round(float(r["trial.optimizer.lr"]), 12)] == optuna.trial.TrialState.PRUNED
    sel = s.selection.selected
    assert sel is not None and sel["trial_id"] not in {r["trial_id"] for r in stopped}
