"""Every shipped config in configs/ runs end to end, shrunk (tiny data, 2 folds, 1 epoch, 32 px).

The configs are loaded from their files and only shrunk by overrides, so a config that breaks (a
renamed key, an impossible search space, a sampler that no longer works) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pqfn.cli import main as cli_main
from pqfn.config import DataConfig, load_config
from pqfn.records import COMPLETED
from tune_jobs.sweep import run_sweep

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def shrink(tmp_path: Path, data: DataConfig) -> list[str]:
    return [
        f"output_dir={tmp_path / 'runs'}", f"data.path={data.path}", f"data.cache_dir={data.cache_dir}",
        f"data.decode_size={data.decode_size}",
        "data.synthetic={packages: {Ag: 6, NiPdAu: 6, Cu: 6}, image_size: 64, cycle_step: 250}",
        "trial.folds=2", "trial.epochs=1", "trial.eval_every=1", "trial.resolution=32", "trial.data_size=40",
        "trial.batch_size=8", "trial.max_copies=10", "trial.eval_batch_size=64",
        "selection.floor=0.0", "selection.min_class_recall=0.0",
        "resources.cpus_per_trial=1", "resources.gpus_per_trial=0",
    ]


@pytest.mark.parametrize("name, extra", [
    # the README's main job: shuffled-grid sampler over its own space, W&B offline, held-out evaluation
    ("quickstart", ["search.num_samples=2", "search.space={trial.resolution: {choice: [32, 40]}, "
                    "trial.data_size: {choice: [40]}}", "wandb.mode=offline", "search.progress_every_s=0.5"]),
    # the study's one-axis-at-a-time grid (two axes of two values: 3 points, the centre shared)
    ("paper", ["search.axes=[{trial.resolution: [32, 40]}, {trial.batch_size: [8, 16]}]", "wandb.mode=disabled"]),
    # TPE with ASHA on val/loss
    ("paper-optuna", ["search.num_samples=2", "search.n_startup_trials=1", "search.asha.grace_period=1",
                      "search.space={trial.resolution: {choice: [32, 40]}, trial.optimizer.lr: "
                      "{loguniform: [0.0005, 0.003]}}", "trial.epochs=2", "wandb.mode=disabled"]),
])
def test_shipped_config_runs_end_to_end(name: str, extra: list[str], tmp_path: Path, tiny_data_cfg: DataConfig,
                                        ray_local: None, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml", shrink(tmp_path, tiny_data_cfg) + extra)
    s = run_sweep(cfg, log=lambda *a: None)
    run = tmp_path / "runs" / cfg.name
    assert (run / "trials.csv").exists() and (run / "selection.json").exists() and (run / "pareto.png").exists()
    assert s.selection.counts[COMPLETED] >= 1
    assert s.selection.selected is not None
    if cfg.evaluate.enabled:
        assert s.evaluation is not None and (run / "final" / "evaluation.json").exists()
        assert "baselines" in s.evaluation and s.evaluation["n_test_images"] > 0
    assert s.timing["slots"] >= 1 and s.timing["trial_time_sum_s"] > 0
    # the hindsight audit: every completed trial's fold ensemble on the held-out packages, never used to select
    audit = json.loads((run / "audit.json").read_text())
    assert audit["label"].startswith("HINDSIGHT") and audit["selected"] == s.selection.selected["trial_id"]
    scored = [t for t in audit["trials"] if "held_out" in t]
    assert len(scored) == s.selection.counts[COMPLETED] and audit["regret"] >= 0
    # a tiny held-out set (fewer than bootstrap.MIN_PACKAGES packages) has no interval: null bounds (strict JSON)
    assert all(t["held_out"]["bal_acc"]["lo"] is None or t["held_out"]["bal_acc"]["lo"] <= t["held_out"]["bal_acc"]["hi"]
               for t in scored)
    if audit["n_ranked"] < 3:  # no rank correlation of two trials: null and why, not NaN
        assert audit["spearman"] is None and "at least 3" in audit["spearman_note"]
    if name == "quickstart":  # progress lines (plain text, not a terminal here) appear before the first trial ends
        out = capfd.readouterr().out
        assert "[progress " in out and "[1/2] trial" in out
        assert out.index("[progress ") < out.index("[1/2] trial")
    if name == "quickstart":  # its model trained on the masks: the bundle's fingerprint is the pool's with them
        data_file = json.loads((run / "wandb" / "dataset.json").read_text())
        bundle = json.loads((run / "final" / "bundle" / "bundle.json").read_text())
        assert cfg.trial.mask_loss > 0 and bundle["data_fingerprint"] == data_file["pool_fingerprint_with_masks"]
        assert data_file["pool_fingerprint_with_masks"] != data_file["pool_fingerprint"]
    if name == "quickstart":  # `pqfn audit RUN_DIR` recomputes the same figures from the folder
        capfd.readouterr()
        assert cli_main(["audit", str(run)]) == 0
        assert json.loads((run / "audit.json").read_text())["regret"] == audit["regret"]
        assert "hindsight audit" in capfd.readouterr().out
