"""Weights & Biases: one run per trial (job_type 'trial'), one summary run per sweep, offline-first.

Used by the sweep (tune_jobs/) and by `pqfn trial`; no Ray here.

The API key is read from the environment only (WANDB_API_KEY); it is never written to a config,
a log or a results folder. Runs are written under <sweep folder>/wandb with an absolute dir.

A sweep trial is ONE W&B run however often it starts (a retry after a failure, a restore after the
driver died): the run id is the Tune trial id and resume="allow". Online, W&B continues that run.
Offline, every start writes one more `offline-run-<time>-<trial id>` folder; `wandb sync` uploads
the folders of one id into that one run, in order. What an earlier start wrote is read back when
the run starts (wandb_files.logged_steps): a restarted trial logs only the epochs W&B does not hold,
replaying from its checkpoint those that a killed process logged but never wrote.

Lineage (W&B Artifacts): data set -> trial runs -> trial Artifacts -> summary run -> model Artifact. The data set
is a `dataset` Artifact holding its fingerprint only (<sweep>/wandb/dataset.json; the scans are never uploaded),
used by every trial run and the summary run; each completed trial logs a small `trial` Artifact (its records),
which the summary run uses; the summary run logs the final bundle as a `model` Artifact. Artifact files are
added in place (policy "immutable"), so an offline sweep folder holds everything `wandb sync` uploads.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pqfn.bundle import BUNDLE_FILE, data_fingerprint
from pqfn.config import Config
from pqfn.data import Dataset
from pqfn.errors import ConfigError
from pqfn.io import atomic_write_text
from pqfn.records import SweepResult, TrialOutcome
from pqfn.report import trial_table
from pqfn.wandb_files import logged_steps, written

SERVICE_ENV = "WANDB_SERVICE"
INIT_ATTEMPTS, INIT_WAIT_S = 5, 3.0  # up to 30 s of waiting for a run id still in use
WRITTEN_WAIT_S = 30.0  # how long finish_run waits for wandb-core to write an offline run's file
DATASET_FILE = "dataset.json"  # <sweep>/wandb/dataset.json: the content of the dataset Artifact
TRIAL_FILE = "trial.json"  # <sweep>/trials/<id>/trial.json: the content of a trial Artifact


def resolve_mode(cfg: Config) -> str:
    mode = cfg.wandb.mode
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def check_mode(cfg: Config) -> str:
    """Fail before any training when online logging cannot work."""
    mode = resolve_mode(cfg)
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError(
            "wandb.mode: online needs the WANDB_API_KEY environment variable (never put the key in a config); "
            "set it, or use wandb.mode=offline and upload later with `wandb sync`"
        )
    return mode


def sweep_dir(cfg: Config) -> Path:
    return (cfg.output_dir / cfg.name).resolve()


def flat_config(cfg: Config) -> dict[str, Any]:
    """Readable flat keys: trial.resolution, trial.optimizer.lr, data.source, ..."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    dumped = cfg.model_dump(mode="json")
    walk("", {k: dumped[k] for k in ("name", "data", "trial", "resources")})
    return out


def own_service() -> None:
    """Log through a W&B service of this process, never one inherited from a parent (WANDB_SERVICE, which
    wandb.init exports, so Ray workers and subprocesses of a process that used W&B connect to its service).

    An inherited service outlives this process: after a SIGKILL the run id stays "in use" there, so the
    restarted trial could not log, and the epochs it had not written yet sit in another process's buffer.
    The token reads "<version>-<pid of the service's owner>-unix|tcp-...".
    """
    token = os.environ.get(SERVICE_ENV)
    if token is not None and token.split("-")[1:2] != [str(os.getpid())]:
        del os.environ[SERVICE_ENV]


def init_run(cfg: Config, *, job_type: str, name: str, config: dict[str, Any], folder: Path | None = None,
             run_id: str | None = None) -> Any:
    """A W&B run, or None when W&B is disabled. With run_id, the run of that id is continued (resume="allow")."""
    mode = check_mode(cfg)
    if mode == "disabled":
        return None
    import wandb

    own_service()
    d = (folder or sweep_dir(cfg)).resolve()
    d.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = dict(
        project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.name, job_type=job_type, name=name,
        config=config, dir=str(d), mode=mode, reinit="create_new", id=run_id, resume="allow" if run_id else None,
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_meta=True),
    )
    # Logging must never fail a trial: if W&B cannot start (a run id still "in use" in a service that has not
    # noticed its client died, a full disk), wait a little, then go on without W&B for this run, with a warning.
    for attempt in range(INIT_ATTEMPTS):
        try:
            return wandb.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - wandb raises several kinds; none may stop training
            if attempt + 1 == INIT_ATTEMPTS:
                warnings.warn(f"W&B: run {run_id or name} not logged ({type(e).__name__}: {str(e)[:200]})", stacklevel=2)
                return None
            time.sleep(INIT_WAIT_S * (attempt + 1))
    return None


def finish_run(run: Any) -> None:
    """run.finish(), and for an offline run: return once its file is complete on disk (its exit record written).

    wandb-core closes a run's file after finish() has returned; a restart, a `wandb sync` or a reader started
    right then would see an empty file. A run not written within WRITTEN_WAIT_S gets a warning, never an error.
    """
    run.finish()
    if not getattr(run.settings, "_offline", False):
        return
    path = Path(run.settings.sync_file)
    deadline = time.monotonic() + WRITTEN_WAIT_S
    while not written(path):
        if time.monotonic() > deadline:
            warnings.warn(f"W&B: {path} not complete {WRITTEN_WAIT_S:.0f} s after the run finished", stacklevel=2)
            return
        time.sleep(0.05)


@dataclass
class TrialRun:
    """One trial's W&B run; each step (epoch) is logged at most once across the trial's restarts.

    `logged` holds the steps W&B already has for this run id, read from W&B itself when the run starts:
    the offline run files of earlier starts (wandb-core writes them only every 15 s and at finish, so a
    killed start keeps fewer epochs than it logged), or the step an online run resumes at. A restarted
    trial calls replay() with its checkpoint's history, then logs its new epochs.
    """

    run: Any
    logged: set[int] = field(default_factory=set)
    below: int = 0  # online resume: every step below this one is on the server

    def log(self, record: dict[str, Any], step: int) -> None:
        if step < self.below or step in self.logged:
            return
        self.run.log(record, step=step)
        self.logged.add(step)

    def replay(self, history: list[dict[str, Any]], shape: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> None:
        """Log the epochs of a restored checkpoint that W&B does not hold (lost with a killed process)."""
        for rec in history:
            self.log(shape(rec), step=int(rec["epoch"]))

    def finish(self) -> None:
        finish_run(self.run)


def trial_run(cfg: Config, overrides: dict[str, Any], trial_name: str | None = None, trial_id: str | None = None,
              folder: Path | None = None) -> TrialRun | None:
    """A W&B run for one trial (sweep trials and `pqfn trial` alike); None when W&B is disabled.

    With trial_id, the run's id is the trial id, so a retried or restored trial continues its own run.
    """
    name = trial_name or "trial-" + "-".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(overrides.items()))
    flat = flat_config(cfg) | {f"search.{k}": v for k, v in overrides.items()} | {"trial_id": trial_id}
    run = init_run(cfg, job_type="trial", name=name, config=flat, folder=folder, run_id=trial_id)
    if run is None:
        return None
    if trial_id is None:
        return TrialRun(run)
    if resolve_mode(cfg) == "offline":
        sync_dir = Path(run.settings.sync_dir)
        return TrialRun(run, logged_steps(sync_dir.parent, trial_id, exclude=sync_dir))
    return TrialRun(run, below=int(run.starting_step) if run.resumed else 0)


def summary_run(cfg: Config, sdir: Path, rows: list[TrialOutcome], result: SweepResult) -> None:
    """One run per sweep (job_type 'sweep-summary'): trials table, selection (with its ties), plots, held-out
    results beside the trivial baselines."""
    run = init_run(cfg, job_type="sweep-summary", name=f"{cfg.name}-summary", config=flat_config(cfg))
    if run is None:
        return
    import wandb

    data_file = sweep_dir(cfg) / "wandb" / DATASET_FILE
    data_name = None
    if data_file.exists():
        use_artifact(run, dataset_artifact(data_file))
        data_name = json.loads(data_file.read_text())["name"]
    for r in rows:
        art = trial_artifact(cfg, sdir / "trials" / r.trial_id)
        if art is not None:
            use_artifact(run, art)
    cols, flat = trial_table(rows)
    run.log({"trials": wandb.Table(columns=list[Any](cols), data=[[r.get(c, "") for c in cols] for r in flat])})
    sel = result.selection
    run.summary["selection/rule"] = sel.rule["text"]
    run.summary["selection/reason"] = sel.reason
    run.summary["selection/tied"] = [t["trial_id"] for t in sel.tied]
    if sel.selected is not None:
        run.summary["selection/params"] = sel.selected["params"]
        run.summary["selection/trial_id"] = sel.selected["trial_id"]
        for k, v in sel.selected["metrics"].items():
            if "/" in k and not k.startswith("fold"):
                run.summary[f"selected/{k}"] = v
    if sel.candidates:
        keys = [k for k in sel.candidates[0] if k != "params"]
        run.log({"selection/candidates": wandb.Table(
            columns=["params", *keys], data=[[str(c["params"]), *(c[k] for k in keys)] for c in sel.candidates])})
    images = {"pareto": sdir / "pareto.png", "gap_by_axis": sdir / "gap_by_axis.png",
              "heldout/confusion": sdir / "final" / "confusion.png",
              "heldout/by_metallization_cycles": sdir / "final" / "by_metallization_cycles.png"}
    run.log({k: wandb.Image(str(p)) for k, p in images.items() if p.exists()})
    ev = result.evaluation
    if ev:
        for k in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1"):
            run.summary[f"heldout/{k}"] = ev[k]
            run.summary[f"heldout/raw/{k}"] = ev["raw"].get(k)
        for k, v in ev["baselines"].items():
            run.summary[f"heldout/baseline/{k}"] = v
        run.summary["heldout/prior_strength"] = ev["prior_correction"]["strength"]
        run.summary["heldout/verdict"] = ev["verdict"]
        # Intervals (package bootstrap) and the cheap baselines: heldout/<model>/<metric>/{value,lo,hi}
        iv_rows = [["CNN", k, v["value"], v["lo"], v["hi"]] for k, v in ev.get("intervals", {}).items()]
        for name, c in ev.get("cheap_baselines", {}).items():
            iv_rows += [[name, k, v["value"], v["lo"], v["hi"]] for k, v in c["intervals"].items()]
            run.summary[f"heldout/cheap/{name}/balanced_accuracy"] = c["balanced_accuracy"]
            run.summary[f"heldout/cheap/{name}/macro_f1"] = c["macro_f1"]
        vb = ev.get("versus_baseline")
        if vb:
            iv_rows += [[f"CNN minus {vb['baseline']}", k, v["value"], v["lo"], v["hi"]] for k, v in vb["difference"].items()]
            run.summary["heldout/versus_baseline/outcome"] = vb["outcome"]
            for k, v in vb["difference"].items():
                run.summary[f"heldout/versus_baseline/{k}"] = v["value"]
                run.summary[f"heldout/versus_baseline/{k}_lo"] = v["lo"]
                run.summary[f"heldout/versus_baseline/{k}_hi"] = v["hi"]
        for finding, f in ev.get("findings", {}).items():  # die-pad and bond-pad delamination, each on its own
            for who in [w for w in ("cnn", "baseline") if w in f]:
                iv_rows += [[f"{finding} {who}", k, v["value"], v["lo"], v["hi"]] for k, v in f[who].items()]
                run.summary[f"heldout/findings/{finding}/{who}/accuracy"] = f[who]["accuracy"]["value"]
        lb = ev.get("localisation_baselines")
        if lb:
            for name in [n for n in ("gradcam", "dense_map", "brightest_pixel", "fixed_location") if n in lb]:
                iv_rows += [[f"localisation {name}", f"peak_hit_{c}", v["value"], v["lo"], v["hi"]] for c, v in lb[name].items()]
        if iv_rows:
            run.log({"heldout/intervals": wandb.Table(columns=["model", "metric", "value", "lo", "hi"], data=iv_rows)})
        per = ev["per_class"]
        run.log({"heldout/per_class": wandb.Table(
            columns=["class", "precision", "recall", "f1", "support"],
            data=[[c, v["precision"], v["recall"], v["f1"], v["support"]] for c, v in per.items()])})
        if ev.get("by_metallization_cycles"):
            t = ev["by_metallization_cycles"]
            run.log({"heldout/by_metallization_cycles_table": wandb.Table(columns=list(t[0]), data=[list(r.values()) for r in t])})
    au = result.audit
    if au:  # hindsight, never used to select
        run.summary["audit/label"] = au["label"]
        if au["spearman"] is not None:
            run.summary["audit/spearman"] = au["spearman"]
        else:  # fewer than 3 trials or a constant ranking: no rank correlation, and why
            run.summary["audit/spearman_note"] = au.get("spearman_note", "undefined")
        if "regret" in au:
            run.summary["audit/regret"] = au["regret"]
            run.summary["audit/best_held_out"] = au["best_held_out"]
        key = au["held_out_metric"]
        done = [t for t in au["trials"] if "held_out" in t]
        run.log({"audit/trials": wandb.Table(
            columns=["trial_id", "params", f"cv {au['metric']}", f"held-out {key}", "lo", "hi", "verdict"],
            data=[[t["trial_id"], str(t["params"]), t[f"cv {au['metric']}"], t["held_out"][key]["value"],
                   t["held_out"][key]["lo"], t["held_out"][key]["hi"], t["verdict"]] for t in done])})
    bundle = sdir / "final" / "bundle"
    if ev and sel.selected is not None and (bundle / BUNDLE_FILE).exists():
        run.log_artifact(model_artifact(cfg, bundle, sel.selected, ev, data_name))
    for k, v in result.timing.get("phases_s", {}).items():
        run.summary[f"time/{k}_s"] = v
    if result.timing:
        run.summary["time/search_efficiency"] = result.timing["search_efficiency"]
    finish_run(run)


# ------------------------------------------------------------------ Artifacts (lineage)
def _artifact_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "data"


def write_dataset_file(cfg: Config, data: Dataset, pool: np.ndarray) -> Path | None:
    """The data set as the dataset Artifact records it: fingerprints and counts, never the scans. Written by
    the driver before the search (None when W&B is disabled); an unchanged file is not rewritten, so its
    digest, and so the Artifact version, stays the same across runs and sweeps on the same data."""
    if resolve_mode(cfg) == "disabled":
        return None
    info = {
        "name": "data-" + _artifact_name(Path(cfg.data.path).name),
        "source": cfg.data.source, "path": str(cfg.data.path), "decode_size": cfg.data.decode_size,
        "fingerprint": data_fingerprint(data),  # every decoded image, label and package id
        "pool_fingerprint": data_fingerprint(data.subset(pool)),  # the rows trials train on (= the bundle's)
        "images": len(data), "packages": len(set(data.package_ids.tolist())),
        "pool_images": len(pool), "test_images": len(data) - len(pool),
    }
    if data.masks is not None:  # the bundle of a model trained on the masks (trial.mask_loss > 0) records this one
        info["pool_fingerprint_with_masks"] = data_fingerprint(data.subset(pool), masks=True)
    path = sweep_dir(cfg) / "wandb" / DATASET_FILE
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    if not (path.exists() and path.read_text() == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return path


def use_artifact(run: Any, artifact: Any) -> None:
    """Record that `run` used `artifact`, a draft built here from local files (W&B's lineage edge artifact -> run).

    Online this is run.use_artifact. Offline, wandb refuses use_artifact for any artifact; what it does online
    for a draft (log it flagged use-after-commit: created if new, then marked as used by the run) is written to
    the offline file instead, for `wandb sync` to replay. The same files give the same digest, so every run
    that uses one data set file uses one Artifact version.
    """
    if run.offline:
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact)


def _file_artifact(name: str, kind: str, files: list[Path], root: Path, metadata: dict[str, Any]) -> Any:
    import wandb

    art = wandb.Artifact(name, type=kind, metadata=metadata)
    for f in files:
        art.add_file(str(f), name=f.relative_to(root).as_posix(), policy="immutable")  # no copy: read in place
    return art


def dataset_artifact(path: Path) -> Any:
    info = json.loads(path.read_text())
    return _file_artifact(info["name"], "dataset", [path], path.parent, {k: v for k, v in info.items() if k != "name"})


def trial_artifact(cfg: Config, folder: Path) -> Any | None:
    """A completed trial's records (trial.json) as a small `trial` Artifact; None when the trial did not finish."""
    path = folder / TRIAL_FILE
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    return _file_artifact(_artifact_name(f"{cfg.name}-trial-{info['trial_id']}"), "trial", [path], folder,
                          {"trial_id": info["trial_id"], "params": info["params"], "final": info["history"][-1]})


def write_trial_file(folder: Path, trial_id: str, params: dict[str, Any], history: list[dict[str, float]]) -> Path:
    path = folder / TRIAL_FILE
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"trial_id": trial_id, "params": params, "history": history}, indent=2) + "\n")
    return path


def model_artifact(cfg: Config, bundle: Path, selected: dict[str, Any], evaluation: dict[str, Any],
                   dataset: str | None) -> Any:
    """The final bundle as a `model` Artifact. Metadata: the selected parameters, the held-out evaluation as
    final/evaluation.json holds it (figures, intervals, baselines; its per-group tables left out), the data
    fingerprint and package versions from bundle.json."""
    info = json.loads((bundle / BUNDLE_FILE).read_text())
    heldout = {k: v for k, v in evaluation.items()
               if not (isinstance(v, list) and v and isinstance(v[0], dict))}  # tables: in evaluation.json
    meta = {"sweep": cfg.name, "trial_id": selected["trial_id"], "params": selected["params"],
            "data_fingerprint": info.get("data_fingerprint"), "dataset": dataset, "versions": info.get("versions"),
            "heldout": heldout}
    files = sorted(f for f in bundle.rglob("*") if f.is_file())
    return _file_artifact(_artifact_name(f"{cfg.name}-model"), "model", files, bundle, meta)
