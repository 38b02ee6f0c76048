"""Shared fixtures: a tiny real synthetic data set, decoded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pqfn.config import DataConfig, SynthConfig
from pqfn.data import Dataset, load_dataset


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Decoded-array cache, W&B files and Ray temp files stay inside the test session's temp dir.
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.pop("WANDB_API_KEY", None)
    torch.set_num_threads(1)


TINY_SYNTH = {"packages": {"Ag": 6, "NiPdAu": 6, "Cu": 6}, "image_size": 64, "cycle_step": 250}


@pytest.fixture(scope="session")
def tiny_data_cfg(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    root = tmp_path_factory.mktemp("tiny")
    return DataConfig(path=root / "synthetic", synthetic=SynthConfig(**TINY_SYNTH), decode_size=48,
                      cache_dir=root / "cache", test_fraction=0.2)


@pytest.fixture(scope="session")
def tiny_ds(tiny_data_cfg: DataConfig) -> Dataset:
    return load_dataset(tiny_data_cfg, log=False)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
