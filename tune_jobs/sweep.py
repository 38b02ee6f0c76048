"""`pqfn sweep` / `python -m tune_jobs.sweep CONFIG [key=value ...]`: the sweep service on Ray Tune.

One results folder per sweep (runs/<name>/): resolved config, Tune experiment (restorable), Optuna
study (SQLite), trials.csv, selection.json, plots, the final model and its held-out evaluation.
Running the same command again resumes an interrupted sweep; a different config under the same
name is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from pqfn.config import Config, dump_config, load_config, with_overrides
from pqfn.errors import ConfigError, PqfnError

STATE = "sweep.json"


def absolutize(cfg: Config) -> Config:
    """Paths made absolute on the driver, so every worker (any CWD, any node) reads the same place."""
    ov: dict[str, Any] = {"output_dir": str(cfg.output_dir.resolve()), "data.path": str(cfg.data.path.resolve())}
    for key, p in (("data.cache_dir", cfg.data.cache_dir), ("data.test_manifest", cfg.data.test_manifest),
                   ("trial.pretrained", cfg.trial.pretrained)):
        if p is not None:
            ov[key] = str(Path(p).resolve())
    return with_overrides(cfg, ov, source="paths")


def _comparable(cfg_dump: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg_dump.items() if k != "output_dir"}


def prepare_folder(cfg: Config, *, resume: bool, overwrite: bool) -> tuple[Path, dict[str, Any], bool]:
    """Create or reopen runs/<name>. Returns (folder, state, resuming)."""
    sdir = cfg.output_dir / cfg.name
    state_file = sdir / STATE
    if sdir.exists() and any(sdir.iterdir()):
        if overwrite:
            shutil.rmtree(sdir)
        elif not state_file.exists():
            raise PqfnError(f"{sdir}: exists but is not a pqfn sweep folder; choose another name or output_dir")
        else:
            saved = yaml.safe_load((sdir / "config.yaml").read_text())
            if _comparable(saved) != _comparable(cfg.model_dump(mode="json")):
                raise PqfnError(
                    f"{sdir}: a sweep named {cfg.name!r} with a different config is there; "
                    "use another name (name=...) or --overwrite to replace it"
                )
            return sdir, json.loads(state_file.read_text()), True
    elif resume:
        raise PqfnError(f"{sdir}: nothing to resume")
    sdir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    state = {"study_name": f"{cfg.name}-{stamp}", "created": stamp, "status": "running"}
    (sdir / "config.yaml").write_text(dump_config(cfg))
    (sdir / STATE).write_text(json.dumps(state, indent=2))
    return sdir, state, False


def preflight(cfg: Config, data: Any, pool: Any) -> None:
    """Catch impossible settings before any trial starts (every grid point / every listed choice)."""
    from pqfn.model import check_model_name
    from pqfn.splits import build_pool
    from tune_jobs.space import grid_points, optuna_space

    if cfg.search.type == "grid":
        points = grid_points(cfg)
    else:
        optuna_space(cfg.search)
        points = [{k: v} for k, spec in cfg.search.space.items() for v in (spec.choice or [])]
    for p in points or [{}]:
        c = with_overrides(cfg, p).trial
        check_model_name(c.model)
        build_pool(data, pool, c.data_size, c.max_copies, c.seed)


def build_tuner(cfg: Config, sdir: Path, state: dict[str, Any], trainable: Any) -> Any:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from tune_jobs.searcher import HonestOptunaSearch
    from tune_jobs.space import grid_points, optuna_space

    s = cfg.search
    scheduler = None
    if s.asha.enabled:
        scheduler = ASHAScheduler(
            time_attr="training_iteration", metric=s.asha.metric, mode=s.asha.mode, max_t=cfg.trial.epochs,
            grace_period=s.asha.grace_period, reduction_factor=s.asha.reduction_factor,
        )
    param_space: dict[str, Any] = {}
    if s.type == "optuna":
        multi = s.objective == "multi"
        if multi or s.sampler == "nsga2":
            sampler: Any = optuna.samplers.NSGAIISampler(seed=s.seed)
        elif s.sampler == "shuffled-grid":
            grid = {k: list(v.choice or []) for k, v in s.space.items()}
            sampler = optuna.samplers.GridSampler(grid, seed=s.seed)  # random order, no repeats
        elif s.sampler == "random":
            sampler = optuna.samplers.RandomSampler(seed=s.seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
        searcher = HonestOptunaSearch(
            space=optuna_space(s),
            metric=["val/acc", cfg.selection.gap_metric] if multi else "objective",
            mode=["max", "min"] if multi else "min",  # type: ignore[arg-type]
            sampler=sampler, study_name=state["study_name"],
            storage=optuna.storages.RDBStorage(f"sqlite:///{sdir / 'optuna.db'}"),
        )
        tune_config = tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
            scheduler=scheduler, num_samples=s.num_samples,
        )
    else:
        param_space = {"overrides": tune.grid_search(grid_points(cfg))}
        tune_config = tune.TuneConfig(scheduler=scheduler, num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent)
    run_config = tune.RunConfig(
        name="tune", storage_path=str(sdir), callbacks=[ProgressLines(cfg)],
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=0,
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config), param_space


def _progress_base() -> type:
    from ray.tune import Callback

    return Callback


class ProgressLines(_progress_base()):  # type: ignore[misc]
    """One readable line per finished trial (Tune's own table is off: verbose=0)."""

    def __init__(self, cfg: Config) -> None:
        self.total = cfg.search.num_samples
        if cfg.search.type == "grid":
            from tune_jobs.space import grid_points

            self.total *= len(grid_points(cfg))
        self.done = 0

    def _line(self, trial: Any, what: str) -> None:
        from tune_jobs.trainable import trial_overrides

        self.done += 1
        m = trial.last_result or {}
        params = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in trial_overrides(trial.config).items())
        extra = f"val/acc {m['val/acc']:.3f}, gap/acc {m['gap/acc']:+.3f}, epoch {int(m['epoch'])}" if "val/acc" in m else ""
        print(f"[{self.done}/{self.total}] trial {trial.trial_id} ({params}): {what}{'; ' + extra if extra else ''}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from tune_jobs.trainable import is_complete

        self._line(trial, "completed" if is_complete(trial.last_result or {}) else "stopped early")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "FAILED (see trials.csv, column error)")


def collect(results: Any) -> list[dict[str, Any]]:
    """ResultGrid -> one row per trial (its overrides, final metrics, status)."""
    from pqfn.metrics import MEMORY_METRICS
    from pqfn.report import TRIAL_METRICS
    from pqfn.selection import COMPLETED, FAILED, STOPPED
    from tune_jobs.trainable import is_complete, trial_overrides

    rows = []
    for r in results:
        m = dict(r.metrics or {})
        status = FAILED if r.error is not None else (COMPLETED if is_complete(m) else STOPPED)
        row: dict[str, Any] = {
            "trial_id": m.get("trial_id") or Path(r.path).name, "status": status,
            "params": trial_overrides(r.config or {}),
            "metrics": {k: v for k, v in m.items() if "/" in k or k in ("epoch", "epochs", "objective")},
            "epoch": m.get("epoch", 0), "node_ip": m.get("node_ip", ""), "node_id": m.get("node_id", ""),
            "restored_from": m.get("restored_from", 0.0),
            "time_total_s": m.get("time_total_s", 0.0),
            "error": "" if r.error is None else str(r.error).strip().splitlines()[-1][:300],
        }
        for k in (*TRIAL_METRICS, *MEMORY_METRICS):
            row[k] = m.get(k, float("nan"))
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def run_sweep(cfg: Config, *, address: str | None = None, resume: bool = False, overwrite: bool = False,
              log: Any = print) -> dict[str, Any]:
    import ray
    from ray import tune

    from pqfn.data import load_dataset
    from pqfn.report import write_sweep_outputs
    from pqfn.splits import split_test
    from pqfn.wandb_log import check_mode, summary_run
    from tune_jobs.trainable import make_trainable

    cfg = absolutize(cfg)
    check_mode(cfg)
    t0 = time.perf_counter()
    sdir, state, resuming = prepare_folder(cfg, resume=resume, overwrite=overwrite)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # One snapshot per checkpoint is what makes a killed sweep resumable; Tune's warning about it is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    data = load_dataset(cfg.data)
    holdout = split_test(data, cfg.data.test_fraction, cfg.data.split_seed)
    preflight(cfg, data, holdout.pool)
    log(f"sweep {cfg.name}: {cfg.search.type} search, {cfg.search.num_samples} sample(s), "
        f"{len(holdout.pool)} pool / {len(holdout.test)} held-out images -> {sdir}")

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True, configure_logging=True)
    try:
        check_storage(cfg)
        trainable = make_trainable(cfg, data, holdout.pool)
        tuner, param_space = build_tuner(cfg, sdir, state, trainable)
        tune_path = str(sdir / "tune")
        if resuming and tune.Tuner.can_restore(tune_path):
            log(f"resuming the interrupted sweep in {sdir}")
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, param_space=param_space or None)
        elif resuming:
            _fail_running(cfg, sdir, state)
        # Work from the sweep folder while Tune runs: inside a Ray Job the driver starts in the job's
        # unpacked working_dir, which Ray may delete while the job runs (measured on Ray 2.60: gone
        # before fit() started), and Tune resolves relative paths against the working directory.
        try:
            here: str | None = os.getcwd()
        except FileNotFoundError:
            here = None
        os.chdir(sdir)
        try:
            results = tuner.fit()
        finally:
            if here is not None:
                with contextlib.suppress(OSError):
                    os.chdir(here)
        rows = collect(results)
        summary = write_sweep_outputs(sdir, cfg, rows, data, holdout, log=log)
    finally:
        if started_here:
            ray.shutdown()
    summary["seconds"] = time.perf_counter() - t0
    state["status"] = "done"
    (sdir / STATE).write_text(json.dumps(state, indent=2))
    summary_run(cfg, sdir, rows, summary)
    return summary


def check_storage(cfg: Config) -> None:
    """Results, checkpoints and the Optuna study must be reachable from every node."""
    import ray

    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    if len(hosts) > 1 and not cfg.resources.shared_storage:
        raise PqfnError(
            f"output_dir {cfg.output_dir}: the cluster has nodes on {len(hosts)} hosts but this path is local to the "
            "driver; put output_dir (and data.path) on a filesystem every node mounts at the same path and set "
            "resources.shared_storage=true"
        )


def _fail_running(cfg: Config, sdir: Path, state: dict[str, Any]) -> None:
    """A sweep killed before Tune's first snapshot: nothing to restore; orphaned study trials -> FAIL."""
    if cfg.search.type != "optuna" or not (sdir / "optuna.db").exists():
        return
    import optuna

    from tune_jobs.searcher import fail_orphans

    try:
        study = optuna.load_study(study_name=state["study_name"], storage=f"sqlite:///{sdir / 'optuna.db'}")
    except KeyError:
        return
    fail_orphans(study, set())


def print_summary(s: dict[str, Any], log: Any = print) -> None:
    sel = s["selection"]
    c = sel["counts"]
    log("")
    log(f"trials: {c['completed']} completed, {c['stopped']} stopped early, {c['failed']} failed "
        f"({s['seconds']:.0f} s in all)")
    if sel["selected"] is None:
        log(f"no configuration selected: {sel['reason']}")
    else:
        x = sel["selected"]
        m = x["metrics"]
        params = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in x["params"].items())
        log(f"selected: {params}")
        log(f"  val/acc {m['val/acc']:.3f} +- {m['val/acc_std']:.3f}, gap/acc {m['gap/acc']:+.3f}, "
            f"gap/loss {m['gap/loss']:+.3f} (mean of folds)")
        log(f"  why: {sel['reason']} (rule: {sel['rule']['text']})")
    ev = s.get("evaluation")
    if ev:
        log(f"held-out test ({ev['n_test_images']} images, {ev['n_test_packages']} packages): accuracy {ev['accuracy']:.3f}, "
            f"macro precision {ev['macro_precision']:.3f}, macro recall {ev['macro_recall']:.3f}")
    log(f"results: {s['folder']}  (trials.csv, selection.json, pareto.png, gap_by_axis.png, final/)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pqfn sweep", description="Run a sweep on Ray Tune.")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--address", help="a running Ray cluster; default: a private local one (address='local')")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_intermixed_args(argv)  # key=value overrides may come before or after options
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        cfg = load_config(a.config, a.overrides)
        summary = run_sweep(cfg, address=a.address, resume=a.resume, overwrite=a.overwrite)
    except (PqfnError, ConfigError) as e:
        print(f"pqfn: error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0 if summary["selection"]["selected"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
