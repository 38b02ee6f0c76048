"""Model bundle: round trip, verification of every file, the data fingerprint, prior adjustment."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pqfn.bundle import (
    BUNDLE_FILE,
    WEIGHTS_FILE,
    _content_sha,
    data_fingerprint,
    load_bundle,
    read_info,
    write_bundle,
)
from pqfn.config import CLASSES, TrialConfig
from pqfn.data import Dataset
from pqfn.ensemble import FoldEnsemble
from pqfn.errors import PqfnError
from pqfn.model import build_model
from pqfn.trial import TrialImages, predict_logits
from tests.pqfn.bundles import PRIORS, make_bundle


def test_round_trip_rebuilds_the_same_model_and_preprocessing(tmp_path: Path, tiny_ds: Dataset) -> None:
    folder = make_bundle(tmp_path / "b", members=2, decode_size=tiny_ds.images.shape[-1])
    assert sorted(p.name for p in folder.iterdir()) == [BUNDLE_FILE, WEIGHTS_FILE]
    b = load_bundle(folder)
    assert isinstance(b.model, FoldEnsemble) and len(b.model.members) == 2
    assert b.classes == CLASSES and b.trial.resolution == 32 and b.preprocessing.decode_size == 48
    assert b.adjusts and b.priors is not None and np.allclose(b.priors, PRIORS)
    info = json.loads((folder / BUNDLE_FILE).read_text())
    assert {"format_version", "preprocessing", "trial", "versions", "files", "data_fingerprint", "metrics"} <= set(info)
    # The bundle's resize is the training resize, and its model gives the written model's logits.
    rows = np.arange(6)
    data = TrialImages(tiny_ds, rows, 32, torch.device("cpu"))
    x = b.preprocessing.resize(tiny_ds.images[rows])
    assert torch.equal(x, data.images[data.rows(rows)])
    torch.manual_seed(0)
    original = FoldEnsemble([build_model(b.trial.model) for _ in range(2)])
    ref = predict_logits(b.trial, original, x, torch.device("cpu"))
    assert torch.allclose(predict_logits(b.trial, b.model, x, torch.device("cpu")), ref, atol=1e-6)
    # Probabilities: rows sum to 1; adjusted = softmax(logits + log(priors)).
    logits = ref.numpy().astype(np.float64)
    adjusted = b.probabilities(logits)
    assert np.allclose(adjusted.sum(1), 1) and np.allclose(b.probabilities(logits, adjust=False).sum(1), 1)
    expect = torch.softmax(torch.from_numpy(logits + np.log(PRIORS)), 1).numpy()
    assert np.allclose(adjusted, expect)


def test_a_max_reduce_bundle_resizes_as_its_trial_did_and_an_unknown_reduce_is_refused(
        tmp_path: Path, tiny_ds: Dataset) -> None:
    folder = make_bundle(tmp_path / "max", decode_size=tiny_ds.images.shape[-1], reduce="max")
    b = load_bundle(folder)
    assert b.preprocessing.reduce == "max" and b.trial.reduce == "max"
    info = json.loads((folder / BUNDLE_FILE).read_text())
    assert info["preprocessing"]["reduce"] == "max" and "adaptive_max_pool2d" in " ".join(info["preprocessing"]["steps"])
    rows = np.arange(6)
    data = TrialImages(tiny_ds, rows, 32, torch.device("cpu"), reduce="max")
    x = b.preprocessing.resize(tiny_ds.images[rows])
    assert torch.equal(x, data.images[data.rows(rows)])
    assert not torch.equal(x, TrialImages(tiny_ds, rows, 32, torch.device("cpu")).images[data.rows(rows)])
    # A bundle written before trial.reduce existed (no preprocessing.reduce) resizes as it did then: bilinear.
    old = make_bundle(tmp_path / "old", decode_size=tiny_ds.images.shape[-1])
    info = json.loads((old / BUNDLE_FILE).read_text())
    del info["preprocessing"]["reduce"]
    (old / BUNDLE_FILE).write_text(json.dumps(info | {"content_sha256": _content_sha(info)}))
    assert load_bundle(old).preprocessing.reduce == "bilinear"
    info["preprocessing"]["reduce"] = "nearest"  # hand-edited and re-checksummed: refused by name
    (old / BUNDLE_FILE).write_text(json.dumps(info | {"content_sha256": _content_sha(info)}))
    with pytest.raises(PqfnError, match="preprocessing.reduce 'nearest'"):
        load_bundle(old)


def test_altered_missing_or_newer_bundles_are_refused(tmp_path: Path) -> None:
    good = make_bundle(tmp_path / "good")
    cases = {}
    for name in ("weights", "missing", "json", "version"):
        shutil.copytree(good, tmp_path / name)
        cases[name] = tmp_path / name
    with (cases["weights"] / WEIGHTS_FILE).open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    (cases["missing"] / WEIGHTS_FILE).unlink()
    info = json.loads((good / BUNDLE_FILE).read_text())
    (cases["json"] / BUNDLE_FILE).write_text(json.dumps(info | {"prior_adjust": False}))
    (cases["version"] / BUNDLE_FILE).write_text(json.dumps(info | {"format_version": 99}))
    expected = {"weights": "model.safetensors was altered", "missing": "model.safetensors is missing",
                "json": "bundle.json was altered", "version": "format version 99"}
    for name, folder in cases.items():
        with pytest.raises(PqfnError, match=expected[name]) as e:
            load_bundle(folder)
        assert "\n" not in str(e.value)
    assert read_info(good)["format"] == "pqfn-bundle"


def test_write_refuses_existing_folder_and_a_model_of_another_architecture(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "b")
    with pytest.raises(PqfnError, match="already exists"):
        make_bundle(folder)
    with pytest.raises(PqfnError, match="does not fit resnet34"):
        write_bundle(tmp_path / "c", TrialConfig(model="resnet34"), build_model("resnet18"), priors=None,
                     prior_adjust=False, fingerprint="", metrics={}, decode_size=48)
    assert not (tmp_path / "c").exists()


def test_fingerprint_follows_the_decoded_data(tiny_ds: Dataset) -> None:
    rows = np.arange(10)
    a = data_fingerprint(tiny_ds.subset(rows))
    assert a == data_fingerprint(tiny_ds.subset(rows)) and a.startswith("sha256:")
    images = tiny_ds.images[rows].copy()
    images[0, 0, 0] ^= 1
    changed = Dataset(images, *(getattr(tiny_ds.subset(rows), f) for f in
                                ("labels", "package_ids", "metallization", "cycles", "paths", "is_test", "files")))
    assert data_fingerprint(changed) != a



def test_fingerprint_counts_the_masks_a_dense_head_trained_on(tiny_ds: Dataset) -> None:
    rows = np.arange(10)
    plain = tiny_ds.subset(rows)
    assert plain.masks is None
    # without masks: the fingerprint of before masks counted (sha256 of shape, images, labels, package ids)
    h = hashlib.sha256(b"pqfn-data-v1")
    h.update(json.dumps(list(plain.images.shape)).encode())
    h.update(np.ascontiguousarray(plain.images).tobytes())
    h.update(np.ascontiguousarray(plain.labels, dtype=np.int64).tobytes())
    h.update("\n".join(str(p) for p in plain.package_ids).encode())
    assert data_fingerprint(plain) == "sha256:" + h.hexdigest()
    masks = np.zeros(plain.images.shape, np.uint8)
    held = dataclasses.replace(plain, masks=masks)
    assert data_fingerprint(held) == data_fingerprint(plain)  # held but not trained on: not counted
    a = data_fingerprint(held, masks=True)
    assert a != data_fingerprint(plain) and a == data_fingerprint(dataclasses.replace(plain, masks=masks.copy()), masks=True)
    moved = masks.copy()
    moved[3, 5, 5] = 2  # one bond-pad pixel more
    assert data_fingerprint(dataclasses.replace(plain, masks=moved), masks=True) != a
    assert data_fingerprint(held.subset(np.arange(4)), masks=True) == data_fingerprint(  # subsets carry their masks
        dataclasses.replace(plain.subset(np.arange(4)), masks=masks[:4]), masks=True)
    with pytest.raises(ValueError, match="needs a data set with its masks"):
        data_fingerprint(plain, masks=True)
