"""`pqfn sweep` / `python -m tune_jobs.sweep CONFIG [key=value ...]`: the sweep service on Ray Tune.

`run_sweep` is the whole sweep as one recipe, top to bottom:
load -> hold out -> search -> collect -> select -> evaluate -> write -> log.

One results folder per sweep (runs/<name>/): resolved config, Tune experiment (restorable), Optuna
study (SQLite; a journal file with resources.shared_storage), trials/ (each trial's fold models),
trials.csv, selection.json, plots, the final model and its held-out evaluation. Running the same
command again resumes an interrupted sweep; a different config under the same name is refused unless
--overwrite, or unless no trial of the earlier attempt completed (see prepare_folder).
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
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from pqfn.audit import run_audit
from pqfn.config import Config, absolutize_paths, dump_config, load_config, uses_masks, with_overrides
from pqfn.data import Dataset, load_dataset
from pqfn.errors import ConfigError, PqfnError
from pqfn.evaluate import evaluate_selection
from pqfn.io import atomic_write_text, check_output_paths, read_json, read_yaml
from pqfn.metrics import MEMORY_METRICS
from pqfn.model import check_mask_loss, check_model_name
from pqfn.records import COMPLETED, FAILED, STOPPED, SweepResult, TrialOutcome, is_complete
from pqfn.report import print_summary, read_trials_csv, write_sweep
from pqfn.selection import select
from pqfn.splits import HoldOut, build_pool, split_test
from pqfn.wandb_log import check_mode, summary_run
from tune_jobs.cluster import check_address
from tune_jobs.progress import ProgressLines
from tune_jobs.searcher import HonestOptunaSearch, ShuffledGridSampler, fail_orphans
from tune_jobs.space import grid_points, optuna_space
from tune_jobs.trainable import PARAMS, make_trainable, params_of

STATE = "sweep.json"
STUDY_DB = "optuna.db"  # the Optuna study; STUDY_JOURNAL with resources.shared_storage (study_storage)
STUDY_JOURNAL = "optuna.journal"
EXPERIMENT_STATE = "experiment_state-*.json"  # Tune's snapshot of a running experiment, in <sweep>/tune


def _comparable(cfg_dump: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg_dump.items() if k != "output_dir"}


def _with_defaults(saved: Any) -> Any:
    """A saved config.yaml with the keys added since it was written at their defaults (what it ran with), so a
    sweep folder from an earlier version still resumes; as saved when it does not validate."""
    try:
        return Config.model_validate(saved).model_dump(mode="json")
    except (TypeError, ValueError):
        return saved


def prepare_folder(cfg: Config, *, resume: bool, overwrite: bool,
                   log: Callable[..., None] = print) -> tuple[Path, dict[str, Any], bool]:
    """Create or reopen runs/<name>. Returns (folder, state, resuming).

    The same config again resumes. A different config is refused, and nothing is touched, unless
    --overwrite (which deletes the folder) or unless no trial of the earlier attempt completed: a
    sweep that failed before any trial finished (a bad value, a wrong path, every trial diverging)
    holds nothing a corrected rerun could reuse, so the rerun starts afresh and the failed attempt
    is kept, moved whole into <folder>/failed-attempts/<its start time>/ (its logs, errors and W&B
    files stay readable; nothing is deleted). With --resume a different config is always refused.
    """
    sdir = cfg.output_dir / cfg.name
    state_file = sdir / STATE
    if sdir.exists() and any(sdir.iterdir()):
        if overwrite:
            shutil.rmtree(sdir)
        elif not state_file.exists():
            raise PqfnError(f"{sdir}: exists but is not a pqfn sweep folder; choose another name or output_dir")
        else:
            state = read_json(state_file, "sweep state (sweep.json)")
            if not isinstance(state, dict) or not isinstance(state.get("study_name"), str):
                raise PqfnError(f"{state_file}: expected the sweep state a sweep writes (with study_name); "
                                "use another name (name=...) or --overwrite to replace the folder")
            saved = read_yaml(sdir / "config.yaml", "sweep config")
            if _comparable(_with_defaults(saved)) == _comparable(cfg.model_dump(mode="json")):
                return sdir, state, True
            if resume or any_trial_completed(sdir):
                raise PqfnError(
                    f"{sdir}: a sweep named {cfg.name!r} with a different config is there; "
                    "use another name (name=...) or --overwrite to replace it"
                )
            kept = set_aside(sdir, str(state.get("created") or "unknown"))
            log(f"{sdir}: no trial of the earlier attempt completed; it is kept in {kept}, starting afresh")
    elif resume:
        raise PqfnError(f"{sdir}: nothing to resume")
    sdir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    state = {"study_name": f"{cfg.name}-{stamp}", "created": stamp, "status": "running"}
    atomic_write_text(sdir / "config.yaml", dump_config(cfg))
    atomic_write_text(sdir / STATE, json.dumps(state, indent=2))  # last: its presence marks a sweep folder
    return sdir, state, False


def any_trial_completed(sdir: Path) -> bool:
    """Whether a trial in this folder ran its full epoch budget (conservative: True when it cannot tell)."""
    if any((sdir / "trials").glob("*/models.safetensors")):  # written by a trial at its last epoch
        return True
    table = sdir / "trials.csv"
    if not table.exists():
        return False
    try:
        return any(r.status == COMPLETED for r in read_trials_csv(table))
    except PqfnError:
        return True  # damaged: keep refusing rather than guess


def set_aside(sdir: Path, created: str) -> Path:
    """Move everything in sdir into sdir/failed-attempts/<created>/ (renames only; sweep.json last, so an
    interrupted move leaves a folder that is still recognised and is finished by the next rerun)."""
    dest = sdir / "failed-attempts" / created
    n = 1
    while dest.exists():
        n += 1
        dest = sdir / "failed-attempts" / f"{created}-{n}"
    dest.mkdir(parents=True)
    for child in sorted(sdir.iterdir(), key=lambda c: c.name == STATE):
        if child.name != "failed-attempts":
            child.rename(dest / child.name)
    return dest


def run_sweep(cfg: Config, *, address: str | None = None, resume: bool = False, overwrite: bool = False,
              log: Callable[..., None] = print) -> SweepResult:
    """The sweep, as one recipe."""
    check_address(address)
    cfg = absolutize_paths(cfg)
    check_output_paths(folders={"output_dir": cfg.output_dir, "sweep folder": cfg.output_dir / cfg.name})
    check_mode(cfg)
    clock = PhaseClock()
    sdir, state, resuming = prepare_folder(cfg, resume=resume, overwrite=overwrite, log=log)
    # 1. load: decode every image once (generating the synthetic set on first use)
    check_mask_loss(cfg.trial.model, cfg.trial.mask_loss)  # before any mask is looked for
    with clock("data"):
        data = load_dataset(cfg.data, masks=uses_masks(cfg))
    # 2. hold out whole packages before any search; check every configuration can run
    holdout = split_test(data, cfg.data.test_fraction, cfg.data.split_seed)
    preflight(cfg, data, holdout.pool)
    log(f"sweep {cfg.name}: {cfg.search.type} search, {total_trials(cfg)} trial(s), "
        f"{len(holdout.pool)} pool / {len(holdout.test)} held-out images -> {sdir}")
    # 3. search, 4. collect
    with clock("ray_start"):
        started_here = start_ray(address)
    try:
        with clock("search"):
            results = search(cfg, sdir, state, resuming, data, holdout, log, private_ray=address in (None, "local"))
        outcomes = collect(results)
        drop_spent_checkpoints(results)
        slots = trial_slots(cfg)
    finally:
        if started_here:
            ray.shutdown()
    # 5. select the least-overfitting informative configuration
    selection = select(outcomes, cfg.selection)
    # 6. evaluate it on the held-out packages (its fold ensemble, prior-corrected)
    with clock("evaluate"):
        evaluation = evaluate_selection(cfg, sdir, selection, data, holdout, log=log)
    with clock("audit"):  # hindsight: every trial's fold ensemble on the held-out packages, never used to select
        audit = run_audit(cfg, sdir, outcomes, selection, data, holdout, log=log)
    # 7. write trials.csv, selection.json, plots, sweep.json; 8. log the summary run to W&B
    result = SweepResult(folder=str(sdir), selection=selection, evaluation=evaluation,
                         timing=clock.report(outcomes, slots), audit=audit)
    write_sweep(sdir, cfg, outcomes, selection)
    with clock("wandb"):
        summary_run(cfg, sdir, outcomes, result)
    result.timing = clock.report(outcomes, slots)
    state |= {"status": "done", "timing": result.timing}
    atomic_write_text(sdir / STATE, json.dumps(state, indent=2))
    return result


class PhaseClock:
    """Wall time per phase of a sweep, and the search's efficiency (issue: a sweep that wastes nothing)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t

    def report(self, outcomes: list[TrialOutcome], slots: int) -> dict[str, Any]:
        busy = sum(o.time_total_s for o in outcomes)
        search = self.phases.get("search", 0.0)
        return {
            "total_s": time.perf_counter() - self.t0,
            "phases_s": dict(self.phases),
            "trial_time_sum_s": busy,
            "slots": slots,
            # summed trial time / (slots x the search's wall time): 1.0 = every slot trained all the time
            "search_efficiency": busy / (slots * search) if slots and search else float("nan"),
        }


def start_ray(address: str | None) -> bool:
    """Join `address` or start a private local Ray; True when started here (and so stopped here)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if address in (None, "local"):
        quiet_token_notice()
    ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, configure_logging=True)
    return True


class _RayNoise(logging.Filter):
    """Drops two kinds of Tune driver warnings a user cannot act on; every other Ray warning passes.

    - ray.tune.utils.util's `warn_if_slow`: "The `process_trial_result` operation took 0.6 s, which may be
      a performance bottleneck" and "Processing trial results took ... consider reporting results less
      frequently": the driver's bookkeeping per reported epoch (searcher, Optuna storage, snapshot) on a
      busy machine; a trial reports once per measured epoch (trial.eval_every) already.
    - "Experiment state snapshotting has been triggered multiple times...": one snapshot per trial
      checkpoint is what makes a killed sweep resumable (CheckpointConfig(num_to_keep=1)). Tune's
      warning about a slow snapshot (slow storage) is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if record.name == "ray.tune.utils.util":
            return not ("took" in msg and "may be a performance bottleneck" in msg)
        return not msg.startswith("Experiment state snapshotting has been triggered multiple times")


class _TokenNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out"
    for the private local Ray a sweep starts itself: its token is made and used by Ray alone, nothing to do.
    Joining the user's own cluster (--address), this filter is not installed: every Ray message about its token
    (a missing or wrong token) is one the user acts on (cluster/README.md)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


def quiet_token_notice() -> None:
    lg = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenNotice) for f in lg.filters):
        lg.addFilter(_TokenNotice())


def quiet_ray_noise() -> None:
    """Install _RayNoise where those warnings are logged (a filter on a logger sees only its own records)."""
    # The snapshot warning can also be switched off by its threshold (read when Tune builds its state).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in RDB with name: ..."
    for name in ("ray.tune.utils.util", "ray.tune.execution.experiment_state"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _RayNoise) for f in lg.filters):
            lg.addFilter(_RayNoise())


def search(cfg: Config, sdir: Path, state: dict[str, Any], resuming: bool, data: Dataset, holdout: HoldOut,
           log: Callable[..., None], private_ray: bool = False) -> Any:
    """Run (or resume) the Tune experiment; returns Tune's ResultGrid. On a private local Ray (this machine
    only, nothing to autoscale) the resources note about an unset gpus_per_trial is not printed."""
    check_storage(cfg)
    quiet_ray_noise()
    tune_path = str(sdir / "tune")
    # Decided before the Tuner is built: building one writes tuner.pkl, which is all can_restore looks for.
    # A restore needs Tune's experiment state too; without it (a sweep that failed or was killed before
    # Tune's first snapshot, e.g. on a data error) Tune logged a traceback and ran a single trial.
    restorable = resuming and tune.Tuner.can_restore(tune_path) and any(Path(tune_path).glob(EXPERIMENT_STATE))
    trainable = make_trainable(cfg, data, holdout.pool, log, private_ray=private_ray)
    tuner, param_space = build_tuner(cfg, sdir, state, trainable)
    if restorable:
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
        return tuner.fit()
    finally:
        if here is not None:
            with contextlib.suppress(OSError):
                os.chdir(here)


def preflight(cfg: Config, data: Dataset, pool: Any) -> None:
    """Catch impossible settings before any trial starts (every grid point / every listed choice)."""
    if cfg.search.type == "grid":
        points = grid_points(cfg)
    else:
        optuna_space(cfg.search)
        points = [{k: v} for k, spec in cfg.search.space.items() for v in (spec.choice or [])]
    for p in points or [{}]:
        c = with_overrides(cfg, p).trial
        check_model_name(c.model)
        check_mask_loss(c.model, c.mask_loss)
        build_pool(data, pool, c.data_size, c.max_copies, c.seed)


def total_trials(cfg: Config) -> int:
    n = cfg.search.num_samples
    return n * len(grid_points(cfg)) if cfg.search.type == "grid" else n


def trial_slots(cfg: Config) -> int:
    """Trials that can run at once: the cluster's CPUs (or GPUs) over a trial's share, capped by max_concurrent."""
    res = ray.cluster_resources()
    fits = int(res.get("CPU", 1) // cfg.resources.cpus_per_trial)
    gpus = cfg.resources.gpus_per_trial
    if gpus:
        fits = min(fits, int(res.get("GPU", 0) // gpus))
    return max(1, min(fits, cfg.search.max_concurrent, total_trials(cfg)))


def build_tuner(cfg: Config, sdir: Path, state: dict[str, Any], trainable: Any) -> Any:
    s = cfg.search
    scheduler = None
    if s.asha.enabled:
        # Time in epochs, not reports: a trial reports every trial.eval_every epochs.
        scheduler = ASHAScheduler(
            time_attr="epoch", metric=s.asha.metric, mode=s.asha.mode, max_t=cfg.trial.epochs,
            grace_period=s.asha.grace_period, reduction_factor=s.asha.reduction_factor,
        )
    param_space: dict[str, Any] = {}
    if s.type == "optuna":
        multi = s.objective == "multi"
        if multi or s.sampler == "nsga2":
            sampler: Any = optuna.samplers.NSGAIISampler(seed=s.seed)
        elif s.sampler == "shuffled-grid":
            grid = {k: list(v.choice or []) for k, v in s.space.items()}
            sampler = ShuffledGridSampler(grid, seed=s.seed)  # random order, no repeats
        elif s.sampler == "random":
            sampler = optuna.samplers.RandomSampler(seed=s.seed)
        else:
            # constant_liar: running trials count as bad guesses, so concurrent trials are not proposed
            # near-duplicates (Optuna 5's default; explicit because earlier versions had it off).
            sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials, constant_liar=True)
        searcher = HonestOptunaSearch(
            space=optuna_space(s),
            metric=[cfg.selection.metric, cfg.selection.gap_metric] if multi else "objective",
            mode=["max", "min"] if multi else "min",  # type: ignore[arg-type]
            sampler=sampler, study_name=state["study_name"],
            storage=study_storage(cfg, sdir),
        )
        tune_config = tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
            scheduler=scheduler, num_samples=s.num_samples,
        )
    else:
        param_space = {PARAMS: tune.grid_search(grid_points(cfg))}
        tune_config = tune.TuneConfig(scheduler=scheduler, num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent)
    run_config = tune.RunConfig(
        name="tune", storage_path=str(sdir), callbacks=[ProgressLines(total_trials(cfg), trial_slots(cfg), cfg.search.progress_every_s,
                                                        trials_dir=sdir / "trials")],
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=0,
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config), param_space


def collect(results: Any) -> list[TrialOutcome]:
    """Tune's ResultGrid -> one typed outcome per trial."""
    rows = []
    for r in results:
        m = dict(r.metrics or {})
        status = FAILED if r.error is not None else (COMPLETED if is_complete(m) else STOPPED)
        metrics = {k: float(v) for k, v in m.items()
                   if isinstance(v, (int, float)) and ("/" in k or k in ("epoch", "epochs", "objective", "n_folds", "n_repeats"))}
        rows.append(TrialOutcome(
            trial_id=m.get("trial_id") or Path(r.path).name, status=status, params=params_of(r.config or {}),
            metrics=metrics | {k: float(m.get(k, float("nan"))) for k in MEMORY_METRICS},
            epoch=int(m.get("epoch", 0)), node_ip=str(m.get("node_ip", "")), node_id=str(m.get("node_id", "")),
            restored_from=float(m.get("restored_from", 0.0)), time_total_s=float(m.get("time_total_s", 0.0)),
            error="" if r.error is None else str(r.error).strip().splitlines()[-1][:300],
        ))
    return sorted(rows, key=lambda r: r.trial_id)


def drop_spent_checkpoints(results: Any) -> None:
    """Delete the trials' Tune checkpoints once no trial is left to resume.

    A checkpoint holds every fold's model, optimizer and random state (about 3x the trial's
    models.safetensors: 670 MB a trial at the paper's five folds) and exists only to resume the
    trial. When every trial has ended (terminated, or errored: errored trials are not resumed) the
    sweep folder keeps each trial's records and fold models, not its checkpoint; a sweep stopped
    with trials still pending or running keeps them all.
    """
    if results.num_terminated + results.num_errors != len(results):
        return
    for r in results:
        for c in Path(r.path).glob("checkpoint_*"):
            shutil.rmtree(c, ignore_errors=True)


def study_storage(cfg: Config, sdir: Path) -> Any:
    """Where the Optuna study lives: runs/<name>/optuna.db (SQLite), or with resources.shared_storage
    runs/<name>/optuna.journal (Optuna's journal file). SQLite's file locks are unreliable on NFS and
    other network filesystems; the journal appends to one file under a lock taken by creating a
    symlink, an atomic operation on NFS. optuna-dashboard opens either."""
    if cfg.resources.shared_storage:
        return JournalStorage(JournalFileBackend(str(sdir / STUDY_JOURNAL)))
    return RDBStorage(f"sqlite:///{sdir / STUDY_DB}")


def check_storage(cfg: Config) -> None:
    """Results, checkpoints and the Optuna study must be reachable from every node."""
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    if len(hosts) > 1 and not cfg.resources.shared_storage:
        raise PqfnError(
            f"output_dir {cfg.output_dir}: the cluster has nodes on {len(hosts)} hosts but this path is local to the "
            "driver; put output_dir (and data.path) on a filesystem every node mounts at the same path and set "
            "resources.shared_storage=true"
        )


def _fail_running(cfg: Config, sdir: Path, state: dict[str, Any]) -> None:
    """A sweep killed before Tune's first snapshot: nothing to restore; orphaned study trials -> FAIL."""
    if cfg.search.type != "optuna" or not any((sdir / f).exists() for f in (STUDY_DB, STUDY_JOURNAL)):
        return
    try:
        study = optuna.load_study(study_name=state["study_name"], storage=study_storage(cfg, sdir))
    except KeyError:
        return
    fail_orphans(study, set())


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
        check_address(a.address)  # before the sweep folder exists and before Ray: seconds, one line
        cfg = load_config(a.config, a.overrides)
        summary = run_sweep(cfg, address=a.address, resume=a.resume, overwrite=a.overwrite)
    except (PqfnError, ConfigError) as e:
        print(f"pqfn: error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0 if summary.selection.selected is not None else 1


if __name__ == "__main__":
    sys.exit(main())
