"""pqfn bench: both sides really train the same folds; figures are consistent; file mapping is right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pqfn.bench import FileImages, _transforms, bench
from pqfn.cli import main
from pqfn.config import Config, ConfigError, DataConfig, TrialConfig, validate
from pqfn.data import Dataset
from pqfn.trial import use_bf16, use_channels_last

TINY_TRIAL = {"resolution": 32, "folds": 2, "epochs": 1, "data_size": 40, "batch_size": 8, "max_copies": 10,
              "device": "cpu"}


@pytest.fixture
def cfg(tiny_data_cfg: DataConfig) -> Config:
    return validate({"name": "b", "data": tiny_data_cfg.model_dump(mode="json"), "trial": TINY_TRIAL}, "test")


@pytest.mark.slow
def test_bench_runs_both_sides_on_the_same_trial(cfg: Config, tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "bench.json"
    (r,) = bench(cfg, ["config"], epochs=2, out=out, ablate=True, log=lines.append)
    assert r.folds == 2 and r.epochs == 2 and r.resolution == 32
    assert r.train_images == 2 * 2 * 20  # 40 images, 2 folds: 20 training images per fold, 2 epochs
    for side in (r.naive, r.engine):
        assert side.wall_s > 0 and side.images_per_s == pytest.approx(r.train_images / side.wall_s)
        assert 0 <= side.val_acc <= 1 and 0 <= side.train_acc <= 1
    assert r.ratio == pytest.approx(r.naive.wall_s / r.engine.wall_s)
    assert any(f"ratio {r.ratio:.2f}x" in line for line in lines)
    assert set(r.ablation) == {"fp32 (bf16 off)", "contiguous (channels_last off)", "one fold at a time",
                               "native small-map convolutions (matmul off)"}
    assert all(v > 0 for v in r.ablation.values())
    saved = json.loads(out.read_text())
    assert saved["machine"]["torch"] == torch.__version__ and saved["results"][0]["ratio"] == r.ratio


def test_naive_baseline_reads_each_rows_own_file(cfg: Config, tiny_ds: Dataset) -> None:
    files = tiny_ds.files
    assert len(files) == len(tiny_ds) and all(Path(f).is_file() for f in files)
    tc = TrialConfig(**(TINY_TRIAL | {"resolution": cfg.data.decode_size}))
    idx = np.arange(0, len(tiny_ds), 7)
    images = FileImages([str(files[i]) for i in idx], [int(tiny_ds.labels[i]) for i in idx], _transforms(tc, False))
    for j, i in enumerate(idx):
        x, y = images[j]
        assert y == tiny_ds.labels[i]
        pixels = (x[0] * 0.25 + 0.5) * 255  # undo Normalize([0.5], [0.25]) and ToTensor's / 255
        assert (pixels - torch.from_numpy(tiny_ds.images[i]).float()).abs().mean() < 3  # same image, PIL resize


def test_unknown_setting_is_one_line_error(cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'huge'"):
        bench(cfg, ["huge"], epochs=1, log=lambda s: None)
    with pytest.raises(SystemExit) as e:
        main(["bench", "configs/quickstart.yaml", "--settings", "huge"])
    assert e.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err


def test_precision_auto_resolves_per_device() -> None:
    cpu = torch.device("cpu")
    assert use_bf16(TrialConfig(bf16=False), cpu) is False and use_bf16(TrialConfig(bf16=True), cpu) is True
    assert use_bf16(TrialConfig(), cpu) is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert use_channels_last(TrialConfig(), cpu) is True and use_channels_last(TrialConfig(channels_last=False), cpu) is False
    with pytest.raises(ConfigError, match="trial.bf16"):
        validate({"trial": {"bf16": "maybe"}}, "x.yaml")
