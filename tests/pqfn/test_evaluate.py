from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support

from pqfn.bundle import load_bundle
from pqfn.config import CLASSES, EvaluateConfig, TrialConfig
from pqfn.data import Dataset
from pqfn.ensemble import load_members, load_oof
from pqfn.evaluate import evaluate_holdout
from pqfn.splits import split_test
from pqfn.trial import CrossValidation


@pytest.fixture(scope="module")
def trained(tiny_ds: Dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrialConfig, Path]:
    cfg = TrialConfig(model="test_resnet", resolution=32, folds=2, epochs=1, data_size=40, batch_size=8, max_copies=10, device="cpu")
    ho = split_test(tiny_ds, 0.2, seed=0)
    cv = CrossValidation(cfg, tiny_ds, ho.pool)
    cv.fit()
    folder = tmp_path_factory.mktemp("trial")
    cv.save_models(folder)
    return cfg, folder


@pytest.mark.slow  # trains a tiny trial and runs Grad-CAM and the baselines: seconds
def test_holdout_evaluation_files_and_metrics(tiny_ds: Dataset, trained: tuple[TrialConfig, Path], tmp_path: Path) -> None:
    cfg, folder = trained
    ho = split_test(tiny_ds, 0.2, seed=0)
    model = load_members(folder, cfg.model)
    assert len(model.members) == 2
    m, pred = evaluate_holdout(cfg, EvaluateConfig(), model, load_oof(folder), tiny_ds, ho, tmp_path, decode_size=48,
                              log=lambda s: None)
    for f in ("evaluation.json", "confusion.png", "predictions.csv", "by_metallization_cycles.csv",
              "by_metallization_cycles.png", "reliability.png", "bundle/bundle.json", "bundle/model.safetensors"):
        assert (tmp_path / f).exists(), f
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == len(ho.test) == m["n_test_images"]
    assert cm.sum(1).tolist() == np.bincount(tiny_ds.labels[ho.test], minlength=4).tolist()  # natural balance
    assert m["accuracy"] == np.trace(cm) / cm.sum()
    assert json.loads((tmp_path / "evaluation.json").read_text())["confusion_matrix"] == m["confusion_matrix"]
    assert {r["metallization"] for r in m["by_metallization_cycles"]} == {"Ag", "NiPdAu", "Cu"}
    # Baselines beside the model: always-the-pool's-majority-class and chance.
    b = m["baselines"]
    y = tiny_ds.labels[ho.test]
    assert b["majority_accuracy"] == np.mean(y == CLASSES.index(b["majority_class"])) and b["chance_balanced_accuracy"] == 0.25
    assert m["verdict"] and 0 <= m["calibration"]["ece"] <= 1
    # The bundle predicts what the evaluation predicted (same model, preprocessing and prior correction).
    b = load_bundle(tmp_path / "bundle")
    assert b.prior_strength == m["prior_correction"]["strength"] and b.metrics["accuracy"] == m["accuracy"]
    # Probabilities: rows sum to 1, the prediction is their argmax, raw ones are kept beside.
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    probs = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    raw = np.array([[float(r[f"raw_prob_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(raw.sum(1), 1, atol=1e-5)
    assert [r["predicted"] for r in rows] == [CLASSES[i] for i in probs.argmax(1)]
    # The per-class figures agree with scikit-learn on the saved predictions.
    yt = [r["label"] for r in rows]
    yp = [r["predicted"] for r in rows]
    p, r_, f, _ = precision_recall_fscore_support(yt, yp, labels=list(CLASSES), zero_division=0)
    for i, c in enumerate(CLASSES):
        assert m["per_class"][c]["precision"] == pytest.approx(p[i]) and m["per_class"][c]["recall"] == pytest.approx(r_[i])
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yt, yp))
    assert m["macro_f1"] == pytest.approx(f1_score(yt, yp, labels=list(CLASSES), average="macro", zero_division=0))
    # Strength 0 gives the raw figures.
    m0, _ = evaluate_holdout(cfg, EvaluateConfig(prior_strength=0.0), model, load_oof(folder), tiny_ds, ho,
                             tmp_path / "raw", decode_size=48, log=lambda s: None)
    assert m0["accuracy"] == m["raw"]["accuracy"] and m0["confusion_matrix"] == m["raw"]["confusion_matrix"]


def test_out_of_fold_predictions_cover_the_pool_once(tiny_ds: Dataset, trained: tuple[TrialConfig, Path]) -> None:
    _, folder = trained
    idx, logits = load_oof(folder)
    assert len(idx) == len(np.unique(idx)) and logits.shape == (len(idx), 4)
