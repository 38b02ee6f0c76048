"""The CUDA path (skipped without a GPU): data held on the GPU, bf16, the same trial as on CPU, no host
synchronisation inside a training step, evaluation and resume on CUDA, peak memory per trial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pqfn.config import TrialConfig
from pqfn.data import Dataset, with_masks
from pqfn.ensemble import load_members
from pqfn.splits import split_test
from pqfn.trial import CrossValidation, predict_logits, use_bf16

pytestmark = pytest.mark.gpu

TINY = dict(resolution=32, folds=2, epochs=2, data_size=40, batch_size=8, max_copies=10)


def test_trial_runs_on_cuda_with_data_on_the_gpu(tiny_ds: Dataset) -> None:
    pool = split_test(tiny_ds, 0.2, seed=0).pool
    cv = CrossValidation(TrialConfig(**(TINY | {"device": "cuda"})), tiny_ds, pool)
    assert cv.data.images.is_cuda and cv.data.labels.is_cuda
    assert all(next(ln.model.parameters()).is_cuda for ln in cv.learners)
    assert use_bf16(cv.cfg, cv.device) is torch.cuda.is_bf16_supported(including_emulation=False)
    for _ in range(2):
        rec = cv.run_epoch()
    assert all(np.isfinite(v) for v in rec.values())
    assert 0 <= rec["val/acc"] <= 1


def test_cuda_and_cpu_see_the_same_folds(tiny_ds: Dataset) -> None:
    pool = split_test(tiny_ds, 0.2, seed=0).pool
    gpu = CrossValidation(TrialConfig(**(TINY | {"device": "cuda"})), tiny_ds, pool)
    cpu = CrossValidation(TrialConfig(**(TINY | {"device": "cpu"})), tiny_ds, pool)
    assert np.array_equal(gpu.entries, cpu.entries)
    # Resized once on each device: the same images to within rounding.
    diff = (gpu.data.images.cpu().int() - cpu.data.images.int()).abs()
    assert diff.max() <= 1


def test_a_training_epoch_never_waits_on_the_host(tiny_ds: Dataset) -> None:
    """Every step of an epoch (shuffle, gather, augmentation draws, forward, backward, fused optimizer) runs
    without a host synchronisation: any one (.item(), .cpu(), a blocking host-to-device copy) raises here."""
    pool = split_test(tiny_ds, 0.2, seed=0).pool
    cv = CrossValidation(TrialConfig(**(TINY | {"device": "cuda"})), tiny_ds, pool)
    _epoch_without_host_sync(cv)


def _epoch_without_host_sync(cv: CrossValidation) -> None:
    """Fold 1 trains one epoch (after a warm-up epoch: cuDNN plans, the allocator's first blocks) with any host
    synchronisation raising."""
    ln = cv.learners[0]
    ln.train_epoch()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = ln.train_epoch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(loss))


def test_the_dense_model_trains_on_cuda_on_its_masks_without_waiting_on_the_host(tiny_ds: Dataset) -> None:
    """resnet18_dense with trial.mask_loss: masks held on the GPU, augmented there with their images, the
    dense loss in the same step; no host synchronisation in an epoch (the quickstart's model on a GPU)."""
    ds = with_masks(tiny_ds)
    pool = split_test(ds, 0.2, seed=0).pool
    cfg = TrialConfig(**(TINY | {"device": "cuda", "model": "resnet18_dense", "mask_loss": 20.0}))
    cv = CrossValidation(cfg, ds, pool)
    assert cv.data.masks is not None and cv.data.masks.is_cuda
    _epoch_without_host_sync(cv)
    rec = cv.run_epoch()
    assert rec is not None and np.isfinite(rec["val/loss"])


def test_resume_and_evaluation_on_cuda(tiny_ds: Dataset, tmp_path: Path) -> None:
    """A CUDA trial checkpointed after epoch 1 and resumed ends where the uninterrupted one ends; its fold models
    evaluate on CUDA as on the CPU."""
    pool = split_test(tiny_ds, 0.2, seed=0).pool
    cfg = TrialConfig(**(TINY | {"device": "cuda", "bf16": False}))
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        whole = CrossValidation(cfg, tiny_ds, pool)
        whole.run_epoch()
        torch.save(whole.state_dict(), tmp_path / "state.pt")
        end = whole.run_epoch()
        resumed = CrossValidation(cfg, tiny_ds, pool)
        resumed.load_state_dict(torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=False))
        again = resumed.run_epoch()
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before
    assert end is not None and again is not None
    for k in ("train/loss", "val/loss"):
        assert again[k] == pytest.approx(end[k], rel=1e-3, abs=1e-4), k
    whole.save_models(tmp_path / "models")
    model = load_members(tmp_path / "models", cfg.model)
    images = whole.data.images[: 2 * cfg.eval_batch_size]
    on_gpu = predict_logits(cfg, model.to("cuda"), images, torch.device("cuda")).cpu()
    on_cpu = predict_logits(cfg, model.to("cpu"), images.cpu(), torch.device("cpu"))
    assert torch.allclose(on_gpu, on_cpu, atol=2e-2)  # TF32 convolutions on the GPU


@pytest.mark.parametrize("resolution", [100, 350])
def test_peak_memory_per_trial(tiny_ds: Dataset, resolution: int) -> None:
    """Peak GPU memory of one trial (2 folds, evaluation batches of 256), printed for cluster/README.md's sizing."""
    pool = split_test(tiny_ds, 0.2, seed=0).pool
    torch.cuda.reset_peak_memory_stats()
    cfg = TrialConfig(**(TINY | {"device": "cuda", "folds": 2, "resolution": resolution, "epochs": 1, "batch_size": 16}))
    cv = CrossValidation(cfg, tiny_ds, pool)
    cv.run_epoch()
    peak = torch.cuda.max_memory_allocated() / 2**20
    total = torch.cuda.get_device_properties(0).total_memory / 2**20
    print(f"peak GPU memory per trial: {peak:.0f} MiB at {resolution} px, batch 16, eval batch {cfg.eval_batch_size}, "
          f"{cfg.folds} folds, on {torch.cuda.get_device_name(0)} ({total:.0f} MiB)")
    assert 0 < peak < total
