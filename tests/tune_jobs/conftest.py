from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pqfn.config import DataConfig


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A real private local Ray instance (never joins another cluster; stopped by handle)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def sweep_yaml(tmp_path: Path, data: DataConfig, name: str, extra: str) -> Path:
    """A tiny sweep on the session's synthetic data: 2 folds, 32 px, 2 epochs, W&B off unless overridden.

    Tiny models learn next to nothing, so the selection's informativeness guards are off (floor and
    min_class_recall 0): every completed trial is a candidate and one is always selected.
    """
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        f"name: {name}\noutput_dir: {tmp_path / 'runs'}\n"
        f"data:\n  path: {data.path}\n  cache_dir: {data.cache_dir}\n  decode_size: {data.decode_size}\n"
        "  synthetic: {packages: {Ag: 6, NiPdAu: 6, Cu: 6}, image_size: 64, cycle_step: 250}\n"
        "trial: {resolution: 32, folds: 2, epochs: 2, data_size: 40, batch_size: 8, max_copies: 10, device: cpu,\n"
        "        eval_batch_size: 64}\n"
        "selection: {tolerance: 0.5, floor: 0.0, min_class_recall: 0.0}\n"
        f"{extra}"
    )
    return p
