"""Ground-truth delamination masks written by pqfn synth and read back by pqfn.data.load_masks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pqfn.config import SynthConfig
from pqfn.data import Dataset, load_masks
from pqfn.errors import DataError
from pqfn.synth import MASK_BOND_PAD, MASK_DIE_PAD, generate

EXPECTED = {"A": {MASK_DIE_PAD}, "B": {MASK_BOND_PAD}, "C": {MASK_DIE_PAD, MASK_BOND_PAD}, "D": set()}


def test_masks_match_labels(tmp_path: Path) -> None:
    cfg = SynthConfig(packages={"Ag": 4, "NiPdAu": 4, "Cu": 3}, image_size=64, cycle_step=250)
    records = generate(cfg, tmp_path, workers=1)
    assert {r.label for r in records} == {"A", "B", "C", "D"}  # every class is checked below
    for r in records:
        full = np.asarray(Image.open(tmp_path / r.mask))
        assert full.shape == (64, 64) and full.dtype == np.uint8
        assert set(np.unique(full).tolist()) - {0} == EXPECTED[r.label], (r.path, r.label)
    # Read back through the manifest's mask column, resized: the classes survive a 32 px resolution.
    masks = load_masks([tmp_path / r.path for r in records], 32)
    assert masks.shape == (len(records), 32, 32)
    for r, m in zip(records, masks, strict=True):
        assert set(np.unique(m).tolist()) - {0} == EXPECTED[r.label], (r.path, r.label)
    with (tmp_path / "manifest.csv").open() as f:
        assert next(csv.reader(f)) == ["path", "label", "package_id", "metallization", "cycles", "mask"]


def test_load_masks_for_dataset_rows(tiny_ds: Dataset) -> None:
    rows = np.flatnonzero(tiny_ds.labels != 3)[:5]
    masks = load_masks(tiny_ds.subset(rows), 24)
    assert masks.shape == (5, 24, 24) and (masks.reshape(5, -1) > 0).any(1).all()


def test_image_without_mask_is_one_clear_error(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "manifest.csv").write_text("path,label\na.png,D\n")  # a manifest made before masks existed
    with pytest.raises(DataError, match="no ground-truth mask for 1 image"):
        load_masks([tmp_path / "a.png"], 8)
