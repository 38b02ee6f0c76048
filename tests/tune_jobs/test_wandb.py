"""W&B offline-first: read the offline run files back; disabled writes nothing; the key never leaks."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pqfn.config import DataConfig, load_config
from pqfn.errors import ConfigError
from pqfn.wandb_files import epoch_steps, offline_runs
from tests.tune_jobs.conftest import sweep_yaml
from tune_jobs import trainable
from tune_jobs.sweep import run_sweep

pytestmark = pytest.mark.slow
DUMMY_KEY = "pqfn-test-dummy-key-0123456789abcdef0123456789abcdef"


def test_offline_runs_and_no_key_leak(tmp_path: Path, tiny_data_cfg: DataConfig, ray_local: None,
                                      monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WANDB_API_KEY", DUMMY_KEY)  # present, but this sweep is told to stay offline
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "wb", (
        "search:\n  type: grid\n  space: {trial.resolution: {choice: [32, 40]}}\n"
        "evaluate: {enabled: false}\nwandb: {mode: offline, project: pqfn-test}\n")))
    logs: list[str] = []
    run_sweep(cfg, log=lambda *a: logs.append(" ".join(map(str, a))))
    sweep = tmp_path / "runs/wb"
    runs = offline_runs(sweep)
    trials = [r for r in runs if r.job_type == "trial"]
    summary = [r for r in runs if r.job_type == "sweep-summary"]
    assert len(trials) == 2 and len(summary) == 1
    assert all(r.group == "wb" for r in runs)
    assert sorted(r.id for r in trials) == sorted(r.config["trial_id"] for r in trials)  # run id = Tune trial id
    assert sorted(r.config["search.trial.resolution"] for r in trials) == [32, 40]
    for r in trials:
        assert r.config["trial.folds"] == 2
        steps = [h for h in r.history if "gap/acc" in h]
        assert [h["_step"] for h in steps] == [1, 2]  # every epoch, epoch = step
        for h in steps:
            assert {"gap/acc", "gap/loss", "train/acc", "val/loss", "fold1/val/acc", "fold2/gap/loss"} <= set(h)
    s = summary[0]
    table = next(h["trials"] for h in s.history if "trials" in h)
    assert table["_type"] == "table-file" and table["nrows"] == 2
    rows = json.loads((s.dir / "files" / table["path"]).read_text())
    assert len(rows["data"]) == 2 and "gap/acc" in rows["columns"]
    assert "selection/rule" in s.summary and "selected/gap/acc" in s.summary
    # The key is read from the environment only: no file and no log line contains it.
    out = capfd.readouterr()
    assert DUMMY_KEY not in out.out + out.err + "\n".join(logs)
    for f in sweep.rglob("*"):
        if f.is_file():
            assert DUMMY_KEY.encode() not in f.read_bytes(), f


def test_trial_failing_once_is_one_run_with_every_epoch_once(tmp_path: Path, tiny_data_cfg: DataConfig,
                                                             ray_local: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial raises once before epoch 4; Tune retries it from its epoch-2 checkpoint (checkpoint_every 2).
    Epoch 3 is trained twice but logged once; the retry continues the same W&B run (offline: a second
    folder with the same run id)."""
    marker = tmp_path / "failed-once"
    run_trial = trainable.run_trial

    def fails_once(config: dict, **kw: object) -> None:  # runs in the Ray worker (pickled by value)
        from pqfn.trial import CrossValidation

        run_epoch = CrossValidation.run_epoch

        def flaky(self: CrossValidation) -> dict[str, float] | None:
            if self.epoch == 3 and not marker.exists():
                marker.touch()
                raise RuntimeError("injected failure (test)")
            return run_epoch(self)

        CrossValidation.run_epoch = flaky  # type: ignore[method-assign]
        try:
            run_trial(config, **kw)  # type: ignore[arg-type]
        finally:
            CrossValidation.run_epoch = run_epoch  # type: ignore[method-assign]

    monkeypatch.setattr(trainable, "run_trial", fails_once)
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "retry", (
        "search:\n  type: grid\n  max_failures: 1\n  checkpoint_every: 2\n  space: {trial.resolution: {choice: [32]}}\n"
        "evaluate: {enabled: false}\nwandb: {mode: offline, project: pqfn-test}\n")), ["trial.epochs=4"])
    s = run_sweep(cfg, log=lambda *a: None)
    assert marker.exists() and s.selection.selected is not None
    rows = list(csv.DictReader((tmp_path / "runs/retry/trials.csv").open()))
    assert len(rows) == 1 and rows[0]["status"] == "completed" and float(rows[0]["restored_from"]) == 2
    trials = [r for r in offline_runs(tmp_path / "runs/retry") if r.job_type == "trial"]
    assert len(trials) == 2 and {r.id for r in trials} == {rows[0]["trial_id"]}  # two starts, one run
    assert epoch_steps(trials) == {rows[0]["trial_id"]: [1, 2, 3, 4]}


def test_disabled_writes_nothing(tmp_path: Path, tiny_data_cfg: DataConfig, ray_local: None) -> None:
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "nowb", (
        "search:\n  type: grid\n  space: {trial.resolution: {choice: [32]}}\n"
        "evaluate: {enabled: false}\nwandb: {mode: disabled}\n")), ["trial.epochs=1"])
    run_sweep(cfg, log=lambda *a: None)
    assert not (tmp_path / "runs/nowb/wandb").exists()


def test_online_without_key_fails_before_training(tmp_path: Path, tiny_data_cfg: DataConfig,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "online", "wandb: {mode: online}\n"))
    with pytest.raises(ConfigError, match="wandb.mode: online needs the WANDB_API_KEY"):
        run_sweep(cfg, log=lambda *a: None)
    assert not (tmp_path / "runs/online").exists()
    assert "WANDB_API_KEY" not in os.environ


def test_artifacts_lineage_data_trials_sweep_model(tmp_path: Path, tiny_data_cfg: DataConfig, ray_local: None) -> None:
    """Offline: the data set's fingerprint is a dataset Artifact that every trial run and the summary run use;
    each completed trial logs a trial Artifact that the summary run uses; the summary run logs the bundle as a
    model Artifact. All files are read in place from the sweep folder, for `wandb sync`."""
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "lin", (
        "search:\n  type: grid\n  space: {trial.resolution: {choice: [32, 40]}}\n"
        "wandb: {mode: offline, project: pqfn-test}\n")))
    s = run_sweep(cfg, log=lambda *a: None)
    sweep = tmp_path / "runs/lin"
    runs = offline_runs(sweep)
    trials = [r for r in runs if r.job_type == "trial"]
    summary = next(r for r in runs if r.job_type == "sweep-summary")
    data_file = json.loads((sweep / "wandb/dataset.json").read_text())
    assert data_file["fingerprint"].startswith("sha256:") and data_file["name"] == "data-synthetic"
    # data -> trials, data -> summary: one dataset (same digest), used, never its scans
    used_data = [a for r in [*trials, summary] for a in r.artifacts if a.type == "dataset"]
    assert len(used_data) == 3 and all(a.used for a in used_data)
    assert len({a.digest for a in used_data}) == 1 and used_data[0].files == ["dataset.json"]
    assert used_data[0].metadata["fingerprint"] == data_file["fingerprint"]
    # trials -> summary: each trial logs its trial Artifact, the summary uses the same (same digest)
    logged = {a.name: a.digest for r in trials for a in r.artifacts if a.type == "trial" and not a.used}
    taken = {a.name: a.digest for a in summary.artifacts if a.type == "trial" and a.used}
    assert len(logged) == 2 and taken == logged
    # summary -> model: the bundle, with the selection, held-out figures, data fingerprint and versions
    model = [a for a in summary.artifacts if a.type == "model"]
    assert len(model) == 1 and not model[0].used and model[0].name == "lin-model"
    meta = model[0].metadata
    assert s.selection.selected is not None and s.evaluation is not None
    assert meta["params"] == s.selection.selected["params"] and meta["trial_id"] == s.selection.selected["trial_id"]
    assert meta["heldout"]["accuracy"] == s.evaluation["accuracy"] and "verdict" in meta["heldout"]
    assert meta["data_fingerprint"] == data_file["pool_fingerprint"] and "torch" in meta["versions"]
    assert "bundle.json" in model[0].files
    for a in [*used_data, *model]:  # in place under the sweep folder (policy immutable): `wandb sync` finds them
        assert all(Path(p).is_relative_to(sweep) and Path(p).is_file() for p in a.local_paths)
    # `wandb sync --dry-run` lists every run folder as one to upload
    folders = sorted(str(p) for p in (sweep / "wandb").glob("offline-run-*"))
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", *folders],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"Would sync {len(folders)} run(s)" in out.stdout + out.stderr and len(folders) == 3
