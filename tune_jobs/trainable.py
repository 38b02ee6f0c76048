"""The Tune adapter: config dict -> trial config -> CrossValidation.fit -> tune.report (every Ray call here).

Every search type hands the trainable the same shape: {"overrides": {dotted key: value}} (grid
points from Tune's grid_search, Optuna suggestions wrapped by HonestOptunaSearch.suggest).
The decoded data set arrives through the object store (tune.with_parameters), read-only, once per
node; it is never re-read from disk per trial or per fold.

Tune hears from a trial only at its measured epochs; in between, the trial's progress inside its epoch
(CrossValidation.progress) is rewritten every PROGRESS_EVERY_S into <trial folder>/progress.json, a side
channel that the driver's console reads (tune_jobs/progress.py).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from pqfn.config import Config, with_overrides
from pqfn.data import Dataset
from pqfn.errors import TrialError
from pqfn.io import load_checkpoint
from pqfn.metrics import process_memory_mb
from pqfn.records import TrialProgress
from pqfn.selection import search_objective
from pqfn.trial import CrossValidation
from pqfn.wandb_log import (
    dataset_artifact,
    trial_artifact,
    trial_run,
    use_artifact,
    write_dataset_file,
    write_trial_file,
)

STATE_FILE = "trial_state.pt"
PARAMS = "overrides"  # the one key under which every search type passes a trial's parameters
PROGRESS_FILE = "progress.json"
PROGRESS_EVERY_S = 1.0


def params_of(config: dict[str, Any]) -> dict[str, Any]:
    """Tune's trial config -> the trial's dotted-key parameters."""
    return dict(config.get(PARAMS) or {})


def trial_folder(cfg: Config, trial_id: str) -> Path:
    """Where a trial's fold models and out-of-fold predictions go (the selected one's become the final model)."""
    return cfg.output_dir / cfg.name / "trials" / trial_id


def read_progress(folder: Path) -> TrialProgress | None:
    """A running trial's latest progress record; None before its first (or when unreadable: it is rewritten)."""
    try:
        return TrialProgress(**json.loads((folder / PROGRESS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


class ProgressWriter:
    """Rewrites <folder>/progress.json every PROGRESS_EVERY_S from a daemon thread (atomically: the driver never
    reads half a file). The trial only counts batches; nothing here touches the device."""

    def __init__(self, folder: Path, source: Callable[[], TrialProgress], every_s: float = PROGRESS_EVERY_S) -> None:
        self.path, self.source, self.every_s = folder / PROGRESS_FILE, source, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pqfn-progress", daemon=True)

    def _run(self) -> None:
        last = ""
        while True:
            text = json.dumps(asdict(self.source()))
            if text != last:
                tmp = self.path.with_name(f".{PROGRESS_FILE}.tmp")
                tmp.write_text(text)
                tmp.replace(self.path)
                last = text
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> ProgressWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)  # a finished trial's progress is its last report


def run_trial(config: dict[str, Any], *, base: Config, data: Dataset, pool: np.ndarray, cpus: float,
              dataset_file: Path | None = None) -> None:
    """A function trainable. It must not return a value (Tune would report it as an extra result)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "Checkpoint successfully created" per epoch
    params = params_of(config)
    cfg = with_overrides(base, params | {"trial.threads": max(1, int(cpus))})
    tc = cfg.trial
    torch.set_num_threads(tc.threads)
    every = cfg.search.checkpoint_every
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    folder = trial_folder(cfg, trial_id)
    (folder / PROGRESS_FILE).unlink(missing_ok=True)  # an earlier start's: not this one's progress

    cv = CrossValidation(tc, data, pool)
    restored_from = 0.0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            cv.load_state_dict(load_checkpoint(Path(d) / STATE_FILE, required=("epoch", "history", "config", "learners"),
                                               error=TrialError))
        restored_from = float(cv.epoch)

    node_id = ray.get_runtime_context().get_node_id()

    def shape(rec: dict[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = dict(rec)
        out["epochs"] = float(tc.epochs)
        out["objective"] = search_objective(rec, cfg.selection)
        out["node_id"] = node_id  # which Ray node ran this epoch (node_ip is the same for nodes on one host)
        out["restored_from"] = restored_from  # epoch of the checkpoint this run resumed from; 0 = fresh
        return out

    # One W&B run per trial (id = trial id) across retries and restores, each epoch once: the restored
    # epochs that W&B lost with a killed process are logged again from the checkpoint's history.
    run = trial_run(cfg, params, trial_name=ctx.get_trial_name(), trial_id=trial_id)
    if run is not None:
        if dataset_file is not None:
            use_artifact(run.run, dataset_artifact(dataset_file))  # lineage: data set -> this trial
        run.replay(cv.history, shape)
    # Checkpoint once checkpoint_every epochs have passed since the last one: records (and so checkpoints)
    # come only at measured epochs (trial.eval_every), which need not be multiples of checkpoint_every.
    saved_at = [cv.epoch]

    def on_epoch(rec: dict[str, float], cv: CrossValidation) -> None:
        out = shape(rec) | process_memory_mb()  # mem/*: the data set maps the object store, shared
        if run is not None:
            run.log(out, step=int(rec["epoch"]))
        last = cv.epoch >= tc.epochs
        if last:
            cv.save_models(folder)  # before the last report: the driver may end the sweep
            write_trial_file(folder, trial_id, params, cv.history)
            if run is not None:
                run.run.log_artifact(trial_artifact(cfg, folder))  # lineage: this trial -> the summary run
        if not last and cv.epoch - saved_at[0] >= every:
            saved_at[0] = cv.epoch
            with tempfile.TemporaryDirectory() as d:
                torch.save(cv.state_dict(), os.path.join(d, STATE_FILE))
                tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(out)

    try:
        with ProgressWriter(folder, cv.progress):
            cv.fit(on_epoch)
    finally:
        if run is not None:
            import wandb

            run.finish()
            wandb.teardown()  # before Ray ends this worker: avoids a lost-connection traceback at exit


def resources(cfg: Config) -> dict[str, float]:
    gpus = cfg.resources.gpus_per_trial
    if gpus is None:
        gpus = 0.25 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"cpu": cfg.resources.cpus_per_trial, "gpu": gpus}


def make_trainable(cfg: Config, data: Dataset, pool: np.ndarray) -> Any:
    res = resources(cfg)
    dataset_file = write_dataset_file(cfg, data, pool)  # once, in the driver: what every run's dataset Artifact holds
    fn = tune.with_parameters(run_trial, base=cfg, data=data, pool=pool, cpus=res["cpu"], dataset_file=dataset_file)
    return tune.with_resources(fn, res)
