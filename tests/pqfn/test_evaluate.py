from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pqfn.config import CLASSES, TrialConfig
from pqfn.data import Dataset
from pqfn.evaluate import evaluate_holdout
from pqfn.splits import split_test


def test_holdout_evaluation_files_and_metrics(tiny_ds: Dataset, tmp_path: Path) -> None:
    ho = split_test(tiny_ds, 0.2, seed=0)
    cfg = TrialConfig(resolution=32, epochs=1, data_size=40, batch_size=8, max_copies=10, device="cpu")
    m = evaluate_holdout(cfg, tiny_ds, ho, tmp_path, log=lambda s: None)
    for f in ("evaluation.json", "confusion.png", "predictions.csv", "model.safetensors",
              "by_metallization_cycles.csv", "by_metallization_cycles.png"):
        assert (tmp_path / f).exists(), f
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == len(ho.test) == m["n_test_images"]
    assert cm.sum(1).tolist() == np.bincount(tiny_ds.labels[ho.test], minlength=4).tolist()  # natural balance
    assert m["accuracy"] == np.trace(cm) / cm.sum()
    assert m["macro_recall"] == np.mean([m["per_class"][c]["recall"] for c in CLASSES])
    assert json.loads((tmp_path / "evaluation.json").read_text())["confusion_matrix"] == m["confusion_matrix"]
    assert {r["metallization"] for r in m["by_metallization_cycles"]} == {"Ag", "NiPdAu", "Cu"}
    # The saved model predicts the same when loaded instead of retrained.
    m2 = evaluate_holdout(cfg, tiny_ds, ho, tmp_path / "again", model_path=tmp_path / "model.safetensors", log=lambda s: None)
    assert m2["confusion_matrix"] == m["confusion_matrix"]
