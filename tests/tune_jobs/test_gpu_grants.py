"""A trial trains on exactly the GPUs Ray grants it: tested on a real local Ray that declares GPUs this CPU
machine does not have (Ray schedules declared GPUs like real ones and names them 0..n-1)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pqfn.config import DataConfig, load_config
from pqfn.data import Dataset
from pqfn.device import device_for_grant
from pqfn.errors import PqfnError, TrialError
from tests.tune_jobs.conftest import sweep_yaml
from tune_jobs import trainable
from tune_jobs.cli import main as pqfn_main
from tune_jobs.sweep import run_sweep

GRID2 = "search:\n  type: grid\n  max_concurrent: 2\n  max_failures: 0\n  space: {trial.resolution: {choice: [32, 40]}}\n"


@pytest.fixture(scope="module")
def ray_gpus() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "trials.csv").open()))


def _last_results(run: Path) -> list[dict[str, Any]]:
    out = []
    for f in (run / "tune").glob("*/result.json"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if lines:
            out.append(lines[-1])
    return out


# -- the rule, without Ray ---------------------------------------------------------------------------------

def test_no_grant_is_the_cpu_even_where_cuda_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, as Ray 2.60 leaves it visible
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_for_grant("auto", []) == torch.device("cpu")
    assert device_for_grant("auto", ["3"]) == torch.device("cuda", 0)  # the granted GPU is the only visible one
    with pytest.raises(TrialError, match="granted no GPU"):
        device_for_grant("cuda", [])
    with pytest.raises(TrialError, match="would sit idle"):
        device_for_grant("cpu", ["0"])


def test_a_grant_without_usable_cuda_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrialError) as e:
        device_for_grant("auto", ["1"])
    msg = str(e.value)
    assert "\n" not in msg and "granted GPU 1" in msg and "refusing to train on the CPU" in msg
    assert f"torch {torch.__version__}" in msg


@pytest.mark.parametrize(("every", "device", "since", "train_s", "write_s", "due"), [
    (1, "cpu", 1, 0.1, 5.0, True),
    (2, "cpu", 1, 99.0, None, False),
    ("auto", "cpu", 1, 0.1, 5.0, True),       # CPU: every measured epoch, as before
    ("auto", "cuda", 1, 0.1, None, True),     # GPU: the first measures what a checkpoint costs
    ("auto", "cuda", 3, 30.0, 2.0, False),    # 30 s of training < 20 x a 2 s write
    ("auto", "cuda", 5, 41.0, 2.0, True),
    ("auto", "cuda", 0, 99.0, 0.1, False),
])
def test_checkpoint_cadence(every: int | str, device: str, since: int, train_s: float, write_s: float | None,
                            due: bool) -> None:
    assert trainable.checkpoint_due(every, torch.device(device), since, train_s, write_s) is due


# -- on a real Ray with declared GPUs ----------------------------------------------------------------------

@pytest.mark.slow  # a real local Ray and trials: seconds each
def test_cpu_trials_on_a_gpu_node_hide_every_gpu(tmp_path: Path, tiny_data_cfg: DataConfig, tiny_ds: Dataset,
                                                  ray_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """gpus_per_trial=0 on a node with GPUs: trained on the CPU, CUDA never started, no GPU visible to it."""
    seen = tmp_path / "seen"
    seen.mkdir()
    real = trainable.run_trial

    def recording(config: dict[str, Any], **kw: Any) -> None:
        real(config, **kw)
        (seen / f"{os.getpid()}.json").write_text(json.dumps({
            "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda_started": torch.cuda.is_initialized()}))

    monkeypatch.setattr(trainable, "run_trial", recording)
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "cpu0", GRID2 + "evaluate: {enabled: false}\n"
                                 "wandb: {mode: disabled}\nresources: {gpus_per_trial: 0}\n"),
                      ["trial.device=auto", "trial.epochs=1"])
    run_sweep(cfg, log=lambda *a: None)
    run = tmp_path / "runs/cpu0"
    assert [r["status"] for r in _rows(run)] == ["completed", "completed"]
    assert [(r["device"], r["gpu_ids"]) for r in _last_results(run)] == [("cpu", "")] * 2
    records = [json.loads(f.read_text()) for f in seen.glob("*.json")]
    assert records == [{"cvd": "", "cuda_started": False}] * 2


@pytest.mark.slow  # a real local Ray and trials: seconds each
def test_gpu_trials_get_disjoint_gpus_and_refuse_without_cuda(tmp_path: Path, tiny_data_cfg: DataConfig,
                                                              tiny_ds: Dataset, ray_gpus: None) -> None:
    """Two trials of 1 GPU each at once get GPUs 0 and 1; each, finding no usable CUDA, fails with one line
    naming its own GPU instead of training on the CPU (before: both trained on the CPU, exit 0)."""
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "gpu1", GRID2 + "evaluate: {enabled: false}\n"
                                 "wandb: {mode: disabled}\nresources: {gpus_per_trial: 1}\n"), ["trial.device=auto"])
    s = run_sweep(cfg, log=lambda *a: None)
    rows = _rows(tmp_path / "runs/gpu1")
    assert [r["status"] for r in rows] == ["failed", "failed"] and s.selection.selected is None
    errors = [r["error"] for r in rows]
    assert all("refusing to train on the CPU" in e and "\n" not in e for e in errors), errors
    granted = sorted(e.split("granted GPU ")[1].split(" ")[0] for e in errors)
    assert granted == ["0", "1"]
    assert not list((tmp_path / "runs/gpu1/trials").glob("*/models.safetensors"))  # nothing trained


@pytest.mark.slow  # a real local Ray and trials: seconds each
def test_fractional_gpus_pack_trials_on_one_gpu(tmp_path: Path, tiny_data_cfg: DataConfig, tiny_ds: Dataset,
                                                ray_gpus: None, capfd: pytest.CaptureFixture[str]) -> None:
    """gpus_per_trial=0.5: the issue's reproduction (both trials used to finish on the CPU, exit 0)."""
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "half", GRID2 + "evaluate: {enabled: false}\n"
                                 "wandb: {mode: disabled}\nresources: {gpus_per_trial: 0.5}\n"), ["trial.device=auto"])
    run_sweep(cfg, log=lambda *a: None)
    errors = [r["error"] for r in _rows(tmp_path / "runs/half")]
    assert len(errors) == 2 and all("refusing to train on the CPU" in e for e in errors), errors
    failed = [ln for ln in capfd.readouterr().out.splitlines() if "FAILED" in ln]  # the console says why
    assert len(failed) == 2 and all("FAILED: the trial was granted GPU 0" in ln for ln in failed), failed


@pytest.mark.slow  # starts the module's real local Ray (5-7 s), which the fast tier leaves to the slow one
def test_device_and_grant_that_disagree_are_refused_before_any_trial(tmp_path: Path, tiny_data_cfg: DataConfig,
                                                                     ray_gpus: None) -> None:
    for res, match in (("gpus_per_trial: 0", "trial.device=cuda but resources.gpus_per_trial is 0"),):
        cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "mis", GRID2 + f"resources: {{{res}}}\n"
                                     "wandb: {mode: disabled}\n"), ["trial.device=cuda"])
        with pytest.raises(PqfnError, match=match):
            run_sweep(cfg, log=lambda *a: None)
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "mis2", GRID2 + "resources: {gpus_per_trial: 0.5}\n"
                                 "wandb: {mode: disabled}\n"))
    with pytest.raises(PqfnError, match="would sit idle"):
        run_sweep(cfg, log=lambda *a: None)


def test_http_address_to_sweep_points_at_submit(tmp_path: Path, tiny_data_cfg: DataConfig,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = sweep_yaml(tmp_path, tiny_data_cfg, "http", "wandb: {mode: disabled}\n")
    assert pqfn_main(["sweep", str(cfg), "--address", "http://127.0.0.1:8265"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pqfn submit" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()  # refused before the sweep folder was created


def test_a_node_that_does_not_see_the_sweep_folder_refuses(tmp_path: Path, tiny_data_cfg: DataConfig) -> None:
    """A worker whose output_dir is a local folder (not the driver's) stops its trial with one line."""
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "local", ""))
    with pytest.raises(TrialError, match="does not see the sweep folder") as e:
        trainable.check_shared(cfg)
    assert "\n" not in str(e.value)
    (cfg.output_dir / cfg.name).mkdir(parents=True)
    (cfg.output_dir / cfg.name / "sweep.json").write_text("{}")
    trainable.check_shared(cfg)
