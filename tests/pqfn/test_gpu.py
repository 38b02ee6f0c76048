"""The CUDA path (skipped without a GPU): data held on the GPU, bf16, the same trial as on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pqfn.config import TrialConfig
from pqfn.data import Dataset
from pqfn.splits import split_test
from pqfn.trial import CrossValidation, use_bf16

pytestmark = pytest.mark.gpu

TINY = dict(resolution=32, folds=2, epochs=2, data_size=40, batch_size=8, max_copies=10)


def test_trial_runs_on_cuda_with_data_on_the_gpu(tiny_ds: Dataset) -> None:
    pool = split_test(tiny_ds, 0.2, seed=0).pool
    cv = CrossValidation(TrialConfig(**(TINY | {"device": "cuda"})), tiny_ds, pool)
    assert cv.data.images.is_cuda and cv.data.labels.is_cuda
    assert all(next(ln.model.parameters()).is_cuda for ln in cv.learners)
    assert use_bf16(cv.cfg, cv.device) is torch.cuda.is_bf16_supported()
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
