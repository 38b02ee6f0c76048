"""Kill a sweep's driver with SIGKILL mid-run, then resume it with the same command.

The sweep runs with resources.shared_storage=true, so its Optuna study is the journal file
(optuna.journal) and its W&B runs are offline: after the resume every trial is one W&B run with
every epoch once, and `pqfn report` re-selects from the folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from pqfn.config import DataConfig, load_config
from pqfn.data import Dataset
from pqfn.wandb_files import epoch_steps, offline_runs
from tests.tune_jobs.conftest import sweep_yaml
from tune_jobs.sweep import STUDY_DB, STUDY_JOURNAL, study_storage

pytestmark = pytest.mark.slow
T = optuna.trial.TrialState


def _states(run: Path) -> list[T]:
    if not (run / "sweep.json").exists() or not (run / STUDY_JOURNAL).exists():
        return []
    name = json.loads((run / "sweep.json").read_text())["study_name"]
    try:
        storage = study_storage(load_config(run / "config.yaml"), run)
        return [t.state for t in optuna.load_study(study_name=name, storage=storage).trials]
    except Exception:  # noqa: BLE001 - the study may not exist yet
        return []


def test_sigkill_driver_then_resume(tmp_path: Path, tiny_data_cfg: DataConfig, tiny_ds: Dataset) -> None:
    cfg = sweep_yaml(tmp_path, tiny_data_cfg, "kill", (
        "search:\n  num_samples: 4\n  max_concurrent: 2\n  n_startup_trials: 4\n"
        "  space: {trial.optimizer.lr: {loguniform: [0.0005, 0.005]}}\n"
        "resources: {shared_storage: true}\n"
        "evaluate: {enabled: false}\nwandb: {mode: offline, project: pqfn-test}\n"))
    run = tmp_path / "runs/kill"
    cmd = [sys.executable, "-m", "tune_jobs.sweep", str(cfg), "trial.epochs=3"]
    log = (tmp_path / "first.log").open("w")
    p = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while T.COMPLETE not in _states(run):
            assert p.poll() is None, "the sweep ended before it could be killed: " + (tmp_path / "first.log").read_text()[-2000:]
            assert time.time() < deadline, "no trial completed in time"
            time.sleep(0.3)
        os.kill(p.pid, signal.SIGKILL)  # the driver only, mid-run
        p.wait()
    finally:
        # Stop exactly the processes this sweep started (its own session), never a machine-wide `ray stop`.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert T.RUNNING in _states(run) or len(_states(run)) < 4  # it really was interrupted

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, start_new_session=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming" in r.stdout
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert len(rows) == 4 and len({x["trial_id"] for x in rows}) == 4
    assert all(x["status"] == "completed" and x["epoch"] == "3" for x in rows)
    states = _states(run)
    assert T.RUNNING not in states  # none left RUNNING in the study
    assert states.count(T.COMPLETE) == 4  # every trial completed exactly once
    assert not (run / STUDY_DB).exists()  # the journal, not SQLite
    # One W&B run per trial across the kill and the restore, each epoch logged once.
    trials = [x for x in offline_runs(run) if x.job_type == "trial"]
    assert epoch_steps(trials) == {x["trial_id"]: [1, 2, 3] for x in rows}
    # `pqfn report` re-selects from the folder (no Ray, no study needed) and names the same trial.
    selected = json.loads((run / "selection.json").read_text())["selected"]["trial_id"]
    rep = subprocess.run([str(Path(sys.executable).parent / "pqfn"), "report", str(run)], capture_output=True, text=True,
                         timeout=120)
    assert rep.returncode == 0 and selected in rep.stdout, rep.stdout[-2000:] + rep.stderr[-2000:]
