"""The sweep folder: resume, refuse, or (when nothing of value is there) accept a corrected rerun. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pqfn.config import DataConfig, load_config
from pqfn.data import Dataset
from pqfn.errors import PqfnError
from tests.tune_jobs.conftest import sweep_yaml
from tune_jobs.sweep import prepare_folder, run_sweep


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_before_any_trial_accepts_the_corrected_rerun(tmp_path: Path, tiny_data_cfg: DataConfig,
                                                             tiny_ds: Dataset) -> None:
    yaml = sweep_yaml(tmp_path, tiny_data_cfg, "fix", (
        "search:\n  type: grid\n  space: {trial.resolution: {choice: [32]}}\nwandb: {mode: disabled}\n"))
    # A typo'd model name fails at the preflight, after the folder was created, before Ray or any trial.
    with pytest.raises(PqfnError, match="trial.model"):
        run_sweep(load_config(yaml, ["trial.model=resnet_18"]), log=lambda *a: None)
    sdir = tmp_path / "runs/fix"
    first = _tree(sdir)
    created = json.loads((sdir / "sweep.json").read_text())["created"]
    # The corrected command (no --overwrite) starts afresh; the failed attempt is kept, byte for byte.
    logs: list[str] = []
    folder, state, resuming = prepare_folder(load_config(yaml), resume=False, overwrite=False, log=logs.append)
    assert folder == sdir and not resuming and state["status"] == "running"
    kept = sdir / "failed-attempts" / created
    assert _tree(kept) == first and "kept in" in logs[0]
    assert "resnet_18" not in (sdir / "config.yaml").read_text()
    # Asking to resume with a different config is still refused.
    with pytest.raises(PqfnError, match="different config"):
        prepare_folder(load_config(yaml, ["trial.epochs=3"]), resume=True, overwrite=False)
    # Once a trial has completed (its fold models are written), a different config is refused; nothing moves.
    models = sdir / "trials/abc_00000/models.safetensors"
    models.parent.mkdir(parents=True)
    models.write_bytes(b"weights")
    before = _tree(sdir)
    with pytest.raises(PqfnError, match="different config"):
        prepare_folder(load_config(yaml, ["trial.epochs=3"]), resume=False, overwrite=False)
    assert _tree(sdir) == before


def test_damaged_sweep_state_is_one_error(tmp_path: Path, tiny_data_cfg: DataConfig) -> None:
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "dmg", "wandb: {mode: disabled}\n"))
    sdir, _, _ = prepare_folder(cfg, resume=False, overwrite=False)
    (sdir / "sweep.json").write_text('{"study_name": "dmg-2')  # half-written
    with pytest.raises(PqfnError, match="sweep.json: ends early"):
        prepare_folder(cfg, resume=False, overwrite=False)
    (sdir / "sweep.json").write_text('{"study_name": "dmg"}')
    (sdir / "config.yaml").write_bytes(b"\x00\x01binary")
    with pytest.raises(PqfnError, match="config.yaml: is a binary file"):
        prepare_folder(cfg, resume=False, overwrite=False)


def test_output_dir_that_is_a_file_fails_before_anything(tmp_path: Path, tiny_data_cfg: DataConfig) -> None:
    (tmp_path / "runs").write_text("not a folder")
    cfg = load_config(sweep_yaml(tmp_path, tiny_data_cfg, "f", "wandb: {mode: disabled}\n"))
    with pytest.raises(PqfnError, match="output_dir .*runs: is a file, expected a folder"):
        run_sweep(cfg, log=lambda *a: None)
    assert (tmp_path / "runs").read_text() == "not a folder"


def test_mask_loss_without_the_dense_model_fails_before_any_trial(tmp_path: Path, tiny_data_cfg: DataConfig) -> None:
    yaml = sweep_yaml(tmp_path, tiny_data_cfg, "masks", (
        "search:\n  type: grid\n  space: {trial.resolution: {choice: [32]}}\nwandb: {mode: disabled}\n"))
    with pytest.raises(PqfnError, match=r"trial.mask_loss=5.0 needs trial.model=resnet18_dense"):
        run_sweep(load_config(yaml, ["trial.mask_loss=5"]), log=lambda *a: None)
    assert not (tmp_path / "runs/masks/trials").exists() or not any((tmp_path / "runs/masks/trials").iterdir())


def test_a_sweep_folder_from_before_a_new_key_still_resumes(tmp_path: Path, tiny_data_cfg: DataConfig) -> None:
    yaml = sweep_yaml(tmp_path, tiny_data_cfg, "old", (
        "search:\n  type: grid\n  space: {trial.resolution: {choice: [32]}}\nwandb: {mode: disabled}\n"))
    sdir, _, resuming = prepare_folder(load_config(yaml), resume=False, overwrite=False, log=lambda *a: None)
    assert not resuming
    # config.yaml as an earlier version wrote it: without trial.mask_loss (its default, 0, is what it ran with)
    text = (sdir / "config.yaml").read_text()
    assert "mask_loss: 0.0\n" in text
    (sdir / "config.yaml").write_text(text.replace("  mask_loss: 0.0\n", ""))
    folder, _, resuming = prepare_folder(load_config(yaml), resume=True, overwrite=False, log=lambda *a: None)
    assert folder == sdir and resuming
