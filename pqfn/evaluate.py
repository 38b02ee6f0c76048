"""Held-out evaluation: retrain a configuration on the whole search pool, predict the test packages.

Test images are never augmented and keep their natural class balance. Metrics come from
scikit-learn: confusion matrix, per-class precision / recall / F1 and their macro means (the
reference study's Fig. 7), plus predicted delamination by metallization and thermal cycles
(its Fig. 8) when that metadata exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
)

from pqfn.config import CLASSES, TrialConfig
from pqfn.data import Dataset
from pqfn.errors import TrialError
from pqfn.model import build_model
from pqfn.splits import HoldOut, build_pool
from pqfn.trial import Learner, TrialImages, pick_device, predict_logits


def train_final(
    cfg: TrialConfig, ds: Dataset, pool: np.ndarray, device: torch.device | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Learner:
    """One model on the whole balanced pool (same data_size, resolution, epochs and seed as the trial)."""
    device = device or pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    entries = build_pool(ds, pool, cfg.data_size, cfg.max_copies, cfg.seed)
    if cfg.batch_size > len(entries):
        raise TrialError(f"trial.batch_size={cfg.batch_size} is larger than the pool ({len(entries)} images)")
    data = TrialImages(ds, entries, cfg.resolution, device)
    learner = Learner(cfg, data, data.rows(entries), cfg.seed * 1000, device)
    for epoch in range(1, cfg.epochs + 1):
        loss = learner.train_epoch().item()
        if not np.isfinite(loss):
            raise TrialError(f"final model epoch {epoch}: training loss is {loss}; stopped (lower trial.optimizer.lr)")
        if on_epoch is not None:
            on_epoch(epoch, loss)
    return learner


def predict_test(cfg: TrialConfig, model: torch.nn.Module, ds: Dataset, test: np.ndarray, device: torch.device) -> np.ndarray:
    """Predicted class indices for ds[test], resized to the model's resolution, never augmented."""
    data = TrialImages(ds, test, cfg.resolution, device)
    logits = predict_logits(cfg, model.to(device), data.images[data.rows(test)], device)
    return logits.argmax(1).cpu().numpy()


def holdout_metrics(ds: Dataset, test: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    y = ds.labels[test]
    labels = list(range(len(CLASSES)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "n_test_images": len(test),
        "n_test_packages": len(np.unique(ds.package_ids[test])),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_precision": float(p.mean()),
        "macro_recall": float(r.mean()),
        "macro_f1": float(f.mean()),
        "classes": list(CLASSES),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),  # rows true, columns predicted
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(CLASSES)
        },
    }
    known = (ds.cycles[test] >= 0) & (ds.metallization[test] != "")
    if known.any():
        delam_pred = pred != CLASSES.index("D")
        delam_true = y != CLASSES.index("D")
        table = []
        for m in sorted(set(ds.metallization[test][known])):
            for c in sorted(set(ds.cycles[test][known])):
                sel = known & (ds.metallization[test] == m) & (ds.cycles[test] == c)
                if sel.any():
                    table.append({
                        "metallization": m, "cycles": int(c), "n": int(sel.sum()),
                        "predicted_delaminated": float(delam_pred[sel].mean()),
                        "true_delaminated": float(delam_true[sel].mean()),
                        "predicted_die_pad": float(np.isin(pred[sel], [0, 2]).mean()),
                        "predicted_bond_pad": float(np.isin(pred[sel], [1, 2]).mean()),
                    })
        out["by_metallization_cycles"] = table
    return out


def evaluate_holdout(
    cfg: TrialConfig, ds: Dataset, holdout: HoldOut, out_dir: Path, *, model_path: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or load) the final model, evaluate on held-out packages, write files into out_dir."""
    from safetensors.torch import load_file, save_file

    from pqfn.report import write_evaluation

    device = pick_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if model_path is not None:
        model = build_model(cfg.model)
        try:
            model.load_state_dict(load_file(str(model_path)))
        except Exception as e:  # noqa: BLE001
            raise TrialError(f"--model: cannot load {model_path} into {cfg.model} ({type(e).__name__})") from None
    else:
        log(f"training the final model on the whole search pool ({cfg.data_size} images, {cfg.epochs} epochs) ...")
        learner = train_final(cfg, ds, holdout.pool, device, on_epoch=lambda e, loss: log(f"  epoch {e}: train loss {loss:.4f}"))
        model = learner.model
        tmp = out_dir / "model.safetensors.tmp"
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(out_dir / "model.safetensors")
    pred = predict_test(cfg, model, ds, holdout.test, device)
    metrics = holdout_metrics(ds, holdout.test, pred)
    metrics["seconds"] = time.perf_counter() - t0
    write_evaluation(out_dir, metrics, ds, holdout.test, pred)
    return metrics
