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

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from pqfn.config import Config, TrialConfig, with_overrides
from pqfn.data import Dataset
from pqfn.device import device_for_grant
from pqfn.errors import PqfnError, TrialError
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




def granted_device(requested: str) -> torch.device:
    """This trial's device: exactly the GPUs Ray granted it, or the CPU (with every GPU hidden) when none.

    Ray 2.60 leaves a node's GPUs visible to a 0-GPU task, so CUDA_VISIBLE_DEVICES is set here, before CUDA
    starts, to the granted ids ("" for none). A fractional grant also caps this process's share of the GPU's
    memory, so that trials packed on one GPU cannot starve each other (an OOM is then the trial's own).
    """
    ids = [str(i) for i in ray.get_gpu_ids()]
    if not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    device = device_for_grant(requested, ids)
    if device.type == "cuda":
        share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
        if 0 < share < 1:
            # 10 % of the GPU stays outside the caps: each process's CUDA context (~0.5 GiB) is not counted in them.
            torch.cuda.set_per_process_memory_fraction(share * GPU_MEMORY_CAPPED, device)
    return device


GPU_MEMORY_CAPPED = 0.9


def trials_per_node(cpus_per_trial: float, gpus_per_trial: float, node_cpus: float, node_gpus: float) -> int:
    """How many trials Ray can place on one node: its CPUs over a trial's, and its GPUs over a trial's share."""
    fits = int(node_cpus // cpus_per_trial + 1e-9)
    if gpus_per_trial > 0:
        fits = min(fits, int(node_gpus // gpus_per_trial + 1e-9))
    return fits


def packing_note(cpus_per_trial: float, gpus_per_trial: float, nodes: list[dict[str, float]]) -> str | None:
    """A line when the CPUs a trial asks for leave a GPU node's GPU share unused (e.g. 4 CPUs a trial on an
    8-CPU node with 1 GPU fits 2 trials, while gpus_per_trial=0.25 promises 4), else None."""
    for res in nodes:
        cpu, gpu = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        if gpu <= 0 or gpus_per_trial <= 0:
            continue
        fits, promised = trials_per_node(cpus_per_trial, gpus_per_trial, cpu, gpu), int(gpu // gpus_per_trial + 1e-9)
        if fits < promised:
            return (f"resources: a node with {cpu:g} CPUs and {gpu:g} GPU(s) fits {fits} trial(s) of "
                    f"cpus_per_trial={cpus_per_trial:g}, while gpus_per_trial={gpus_per_trial:g} would fit {promised}: "
                    f"set resources.cpus_per_trial={cpu * gpus_per_trial / gpu:g} to use its GPUs fully")
    return None


CHECKPOINT_COST_RATIO = 20.0  # checkpoint_every=auto on a GPU: train >= 20x the last write between checkpoints


def checkpoint_due(every: int | str, device: torch.device, epochs_since: int, train_s: float,
                   last_write_s: float | None) -> bool:
    """Whether to checkpoint now (at a measured epoch that is not the last), `epochs_since` epochs and
    `train_s` seconds after the last checkpoint (or the start), the last one having taken `last_write_s`."""
    if every == "auto" and device.type == "cpu":
        every = 1  # CPU epochs are long next to a checkpoint's write
    if every != "auto":
        return epochs_since >= int(every)
    if epochs_since < 1:
        return False
    return last_write_s is None or train_s >= CHECKPOINT_COST_RATIO * last_write_s


def check_shared(cfg: Config) -> None:
    """This node sees the sweep folder the driver created (output_dir is shared storage), else one line."""
    sdir = cfg.output_dir / cfg.name
    if not (sdir / "sweep.json").exists():
        raise TrialError(
            f"output_dir {cfg.output_dir}: node {ray.util.get_node_ip_address()} does not see the sweep folder "
            f"{sdir} the driver created; put output_dir on storage every node mounts at the same path "
            "(cluster/README.md, 'Storage')"
        )


def quiet_sigterm_exit() -> None:
    """In a trial's worker: drop the traceback of a SystemExit that cannot propagate, print every other as before.

    When Tune ends a finished trial's worker, Ray's SIGTERM handler raises SystemExit; if the signal lands while
    Python runs a garbage-collection or weakref callback (a WeakSet's `_remove`), the exception cannot propagate
    and Python prints "Exception ignored in: ... SystemExit: 1" with a traceback, which reaches the user's console
    through Ray's log forwarding (seen in about one sweep in four). The worker is being stopped either way: the
    message says nothing a user can act on. Only sys.unraisablehook sees these; nothing else changes.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_pqfn_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, SystemExit):
            return
        previous(unraisable)

    hook._pqfn_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def run_trial(config: dict[str, Any], *, base: Config, data: Dataset, pool: np.ndarray, cpus: float,
              dataset_file: Path | None = None) -> None:
    """A function trainable. It must not return a value (Tune would report it as an extra result)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "Checkpoint successfully created" per epoch
    quiet_sigterm_exit()
    params = params_of(config)
    cfg = with_overrides(base, params | {"trial.threads": max(1, int(cpus))})
    tc = cfg.trial
    torch.set_num_threads(tc.threads)
    every = cfg.search.checkpoint_every
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    folder = trial_folder(cfg, trial_id)
    (folder / PROGRESS_FILE).unlink(missing_ok=True)  # an earlier start's: not this one's progress
    check_shared(cfg)
    device = granted_device(tc.device)
    gpu_ids = os.environ.get("CUDA_VISIBLE_DEVICES", "") if device.type == "cuda" else ""

    with out_of_memory(tc, device):
        cv = CrossValidation(tc, data, pool, device=device)
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
        out["device"] = device.type
        out["gpu_ids"] = gpu_ids  # the GPUs Ray granted ("" on the CPU)
        if device.type == "cuda":
            out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
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
    since = [time.perf_counter()]  # when the last checkpoint (or the trial) finished
    write_s: list[float | None] = [None]  # what the last checkpoint took to write and hand to Tune

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
        if not last and checkpoint_due(every, device, cv.epoch - saved_at[0], time.perf_counter() - since[0],
                                       write_s[0]):
            saved_at[0] = cv.epoch
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as d:
                torch.save(cv.state_dict(), os.path.join(d, STATE_FILE))
                tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))
            since[0] = time.perf_counter()
            write_s[0] = since[0] - t
        else:
            tune.report(out)

    try:
        with ProgressWriter(folder, cv.progress), out_of_memory(tc, device):
            cv.fit(on_epoch)
    finally:
        if run is not None:
            import wandb

            run.finish()
            wandb.teardown()  # before Ray ends this worker: avoids a lost-connection traceback at exit


@contextlib.contextmanager
def out_of_memory(tc: TrialConfig, device: torch.device) -> Iterator[None]:
    """A CUDA out-of-memory error as one line that says it is about resources, not the configuration."""
    try:
        yield
    except torch.OutOfMemoryError:
        if device.type != "cuda":
            raise
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0))
        raise TrialError(
            f"CUDA out of memory: {tc.resolution} px, batch {tc.batch_size}, evaluation batch {tc.eval_batch_size}, "
            f"{tc.folds * tc.repeats} fold models in {min(share, 1.0):g} of a {total:.0f} GiB GPU; raise resources.gpus_per_trial "
            "or lower trial.eval_batch_size (this says nothing about the configuration's quality)"
        ) from None


def resources(cfg: Config, log: Callable[..., None] = print, private_ray: bool = False) -> dict[str, float]:
    """What each trial asks Ray for; a trial.device that contradicts it is refused before any trial starts.
    On a private local Ray without GPUs (a laptop: nothing to autoscale) an unset gpus_per_trial is 0 silently."""
    gpus = cfg.resources.gpus_per_trial
    if gpus is None:
        have = ray.cluster_resources().get("GPU", 0)
        gpus = 0.25 if have > 0 else 0.0
        if not (private_ray and have == 0):
                log(f"resources.gpus_per_trial not set: the cluster has {have:g} GPU(s) now, so each trial asks for "
                f"{gpus:g} (set it for an autoscaling cluster whose GPU nodes are not up yet)")
    device = cfg.trial.device
    if device == "cuda" and gpus == 0:
        raise PqfnError("trial.device=cuda but resources.gpus_per_trial is 0: no trial would be granted a GPU; "
                        "set resources.gpus_per_trial > 0, or trial.device=auto")
    if device == "cpu" and gpus > 0:
        raise PqfnError(f"trial.device=cpu but resources.gpus_per_trial={gpus:g}: the granted GPUs would sit idle; "
                        "set resources.gpus_per_trial=0, or trial.device=auto")
    note = packing_note(cfg.resources.cpus_per_trial, gpus, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    if note:
        log(note)
    return {"cpu": cfg.resources.cpus_per_trial, "gpu": gpus}


def make_trainable(cfg: Config, data: Dataset, pool: np.ndarray, log: Callable[..., None] = print,
                   private_ray: bool = False) -> Any:
    res = resources(cfg, log, private_ray)
    dataset_file = write_dataset_file(cfg, data, pool)  # once, in the driver: what every run's dataset Artifact holds
    fn = tune.with_parameters(run_trial, base=cfg, data=data, pool=pool, cpus=res["cpu"], dataset_file=dataset_file)
    return tune.with_resources(fn, res)
