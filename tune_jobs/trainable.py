"""The Tune adapter: config dict -> trial config -> cross_validate -> tune.report (every Ray call here).

The decoded data set arrives through the object store (tune.with_parameters), read-only, once per
node; it is never re-read from disk per trial or per fold.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from pqfn.config import Config, with_overrides
from pqfn.data import Dataset
from pqfn.metrics import process_memory_mb
from pqfn.selection import search_objective
from pqfn.trial import CrossValidation, cross_validate

STATE_FILE = "trial_state.pt"


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Tune's config -> dotted-key overrides (grid points arrive under 'overrides')."""
    flat = {k: v for k, v in config.items() if k != "overrides"}
    return flat | dict(config.get("overrides") or {})


def run_trial(config: dict[str, Any], *, base: Config, data: Dataset, pool: np.ndarray, cpus: float) -> None:
    """A function trainable. It must not return a value (Tune would report it as an extra result)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "Checkpoint successfully created" per epoch
    cfg = with_overrides(base, trial_overrides(config) | {"trial.threads": max(1, int(cpus))})
    tc = cfg.trial
    torch.set_num_threads(tc.threads)
    every = cfg.search.checkpoint_every

    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)

    run = _wandb_run(cfg, config)
    node_id = ray.get_runtime_context().get_node_id()
    restored_from = float(resume["epoch"]) if resume else 0.0

    def on_epoch(rec: dict[str, float], cv: CrossValidation) -> None:
        out: dict[str, Any] = dict(rec)
        out["epochs"] = float(tc.epochs)
        out["objective"] = search_objective(rec, cfg.selection.gap_metric, cfg.selection.floor)
        out["node_id"] = node_id  # which Ray node ran this epoch (node_ip is the same for nodes on one host)
        out["restored_from"] = restored_from  # epoch of the checkpoint this run resumed from; 0 = fresh
        out |= process_memory_mb()  # mem/*: the data set maps the object store, shared
        if run is not None:
            run.log(out, step=int(rec["epoch"]))
        last = cv.epoch >= tc.epochs
        if not last and cv.epoch % every == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(cv.state_dict(), os.path.join(d, STATE_FILE))
                tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(out)

    try:
        cross_validate(tc, data, pool, on_epoch=on_epoch, resume=resume)
    finally:
        if run is not None:
            import wandb

            run.finish()
            wandb.teardown()  # before Ray ends this worker: avoids a lost-connection traceback at exit


def _wandb_run(cfg: Config, config: dict[str, Any]) -> Any:
    from pqfn.wandb_log import trial_run

    ctx = tune.get_context()
    return trial_run(cfg, trial_overrides(config), trial_name=ctx.get_trial_name(), trial_id=ctx.get_trial_id())


def resources(cfg: Config) -> dict[str, float]:
    gpus = cfg.resources.gpus_per_trial
    if gpus is None:
        import ray

        gpus = 0.25 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"cpu": cfg.resources.cpus_per_trial, "gpu": gpus}


def make_trainable(cfg: Config, data: Dataset, pool: np.ndarray) -> Any:
    res = resources(cfg)
    fn = tune.with_parameters(run_trial, base=cfg, data=data, pool=pool, cpus=res["cpu"])
    return tune.with_resources(fn, res)


def is_complete(metrics: dict[str, Any]) -> bool:
    return metrics.get("epoch", 0) >= metrics.get("epochs", math.inf)
