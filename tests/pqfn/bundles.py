"""A tiny model bundle for the bundle, predict, explain and export tests (untrained: the tests check
plumbing and numerics, not accuracy). By default timm's own test model (0.37 M weights: the bundle is 1.5 MB
where ResNet-18's is 45 MB); tests of what depends on the architecture pass model_name."""

from __future__ import annotations

from pathlib import Path

import torch

from pqfn.bundle import write_bundle
from pqfn.config import TrialConfig
from pqfn.ensemble import FoldEnsemble
from pqfn.model import build_model

PRIORS = [0.2, 0.1, 0.1, 0.6]


def make_bundle(folder: Path, *, members: int = 0, resolution: int = 32, decode_size: int = 48,
                prior_adjust: bool = True, model_name: str = "test_resnet", reduce: str = "bilinear") -> Path:
    torch.manual_seed(0)
    cfg = TrialConfig(model=model_name, resolution=resolution, bf16=False, reduce=reduce)  # fp32 everywhere: exact comparisons
    model = FoldEnsemble([build_model(model_name) for _ in range(members)]) if members else build_model(model_name)
    return write_bundle(folder, cfg, model, priors=PRIORS, prior_adjust=prior_adjust, fingerprint="sha256:test",
                        metrics={"balanced_accuracy": 0.5}, decode_size=decode_size)
