"""Cheap baselines: what the CNN must beat to be worth its cost, fitted on exactly the images it sees.

A ResNet-18 found by a distributed search is only worth its cost if it beats the cheapest model that
could do the job on the same packages, by more than the noise. Two such models, each a class-balanced
scikit-learn logistic regression (standardised features) fitted in well under a second; the intensity
model's choice of size fits once per candidate size, fold and repeat (about a second for the quickstart's
240 images and 3 folds):

- **intensity**: statistics of the decoded scan for the whole scan, its centre (where a QFN's die pad
  sits) and the ring around it (the leads), at the analysis size (ANALYSIS_SIZES, never above
  `data.decode_size`) that cross-validates best on the trial's own folds: quantiles,
  mean, spread, the fraction of bright pixels (absolute and above the region's median) and the high
  quantiles relative to the median (gain-free). Measured on the quickstart's pool (3 folds, 200 and 400
  images) the region split was the strongest of what was tried: whole-scan statistics alone, with a
  16-bin histogram added, and gradient-boosted trees instead of the regression all scored lower in
  cross-validation (README, "Is the CNN worth it?"). The size matters: on the quickstart's pools the
  statistics of the 200 px scans cross-validated at 0.69-0.76 balanced accuracy, of the same scans reduced
  to 64-128 px at 0.89-0.93 (the reduction averages the speckle away), so a larger `data.decode_size`
  for the CNN must not weaken the model it is compared with. Choosing the size on the folds flatters the
  baseline a little: the comparison errs against the CNN.
- **metadata**: metallization (one-hot) and thermal cycles, when the data have those columns. It knows
  nothing of the image: it shows how much of a score the bookkeeping alone explains.

In cross-validation each is fitted on the trial's own folds (the training fold's pool entries, copies
included, exactly what the CNN trains on), so its per-fold figures sit beside the CNN's. On the held-out
packages it is fitted on the trial's whole pool, and its outputs get the same prior correction rule as the
CNN, chosen on its own out-of-fold predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from pqfn.config import CLASSES
from pqfn.data import Dataset, resize_uint8
from pqfn.metrics import class_metrics
from pqfn.splits import Fold

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
BRIGHT = (0.5, 0.6, 0.7, 0.8, 0.9)  # absolute thresholds (pixel / 255)
ABOVE_MEDIAN = (0.2, 0.3, 0.4, 0.5)  # thresholds above the region's own median
CENTRE = (0.22, 0.78)  # the centre square, as fractions of the side: a QFN's die pad
FEATURES_PER_REGION = 2 * len(QUANTILES) + 3 + len(BRIGHT) + len(ABOVE_MEDIAN)
ANALYSIS_SIZES = (64, 96, 128)  # px: the intensity statistics' candidate sizes (each capped at the decoded size)
BASELINE_METRICS = ("val/acc", "val/bal_acc", "val/f1", "val/min_recall")  # what a trial records per baseline


def _region_stats(x: np.ndarray) -> np.ndarray:
    """(N, P) pixel values in [0, 1] -> (N, F) statistics of each row."""
    q = np.quantile(x, QUANTILES, axis=1).T  # (N, 11)
    med = q[:, QUANTILES.index(0.5)][:, None]
    bright = np.stack([(x > t).mean(1) for t in BRIGHT], 1)
    above = np.stack([(x > med + t).mean(1) for t in ABOVE_MEDIAN], 1)
    return np.concatenate([q, x.max(1, keepdims=True), x.mean(1, keepdims=True), x.std(1, keepdims=True),
                           bright, above, q - med], 1)


def intensity_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, 3 x FEATURES_PER_REGION) float32: statistics of the whole scan, its centre and the ring around it."""
    n, h, w = images.shape
    y0, y1 = int(h * CENTRE[0]), int(h * CENTRE[1])
    x0, x1 = int(w * CENTRE[0]), int(w * CENTRE[1])
    x = images.astype(np.float32) / 255.0
    centre = np.zeros((h, w), bool)
    centre[y0:y1, x0:x1] = True
    flat = x.reshape(n, -1)
    parts = [flat, flat[:, centre.reshape(-1)], flat[:, ~centre.reshape(-1)]]
    return np.concatenate([_region_stats(p) for p in parts], 1).astype(np.float32)


def metadata_features(ds: Dataset) -> np.ndarray | None:
    """(N, F): metallization one-hot and cycles / 1000; None when the data have neither column."""
    cols = []
    metals = sorted({str(m) for m in ds.metallization if m})
    for m in metals:
        cols.append((ds.metallization == m).astype(np.float32))
    if (ds.cycles >= 0).any():
        cols.append(np.where(ds.cycles >= 0, ds.cycles, 0).astype(np.float32) / 1000.0)
        cols.append((ds.cycles < 0).astype(np.float32))
    if not metals and not (ds.cycles >= 0).any():
        return None
    return np.stack(cols, 1)


@dataclass(frozen=True)
class Baseline:
    """A cheap model's features for every row of a data set."""

    name: str  # "intensity" or "metadata"
    features: np.ndarray  # (N, F) float32, row i = dataset image i
    size: int | None = None  # intensity: the analysis size (px) the statistics were computed at

    def fit(self, rows: np.ndarray, labels: np.ndarray) -> Pipeline:
        """Class-balanced logistic regression on ds rows (repeated rows = augmented copies weigh more, as in training)."""
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=3000))
        return model.fit(self.features[rows], labels[rows])

    def log_probs(self, model: Pipeline, rows: np.ndarray) -> np.ndarray:
        """(n, classes) log-probabilities; a class absent from the training rows gets probability ~0."""
        out = np.full((len(rows), len(CLASSES)), np.log(1e-12))
        p = model.predict_proba(self.features[rows])
        out[:, model.classes_] = np.log(np.clip(p, 1e-12, None))
        return out


def _intensity_at(ds: Dataset, rows: np.ndarray, size: int) -> np.ndarray:
    """(N, F) intensity statistics of ds rows at `size` px (antialiased, as the CNN's resize); other rows zero."""
    feats = np.zeros((len(ds), 3 * FEATURES_PER_REGION), np.float32)
    for i in range(0, len(rows), 64):  # in chunks: float copies of 840 scans at 400 px would take gigabytes
        chunk = ds.images[rows[i : i + 64]]
        if chunk.shape[-1] != size:
            chunk = resize_uint8(torch.from_numpy(np.ascontiguousarray(chunk)), size)[:, 0].numpy()
        feats[rows[i : i + 64]] = intensity_features(chunk)
    return feats


def _cv_score(b: Baseline, labels: np.ndarray, folds: list[Fold]) -> float:
    idx, lp = out_of_fold(b, labels, folds)
    return float(balanced_accuracy_score(labels[idx], lp.argmax(1)))


def make_baselines(ds: Dataset, rows: np.ndarray | None = None, folds: list[Fold] | None = None) -> list[Baseline]:
    """The cheap baselines this data set supports. Features are computed for `rows` only (default all);
    other rows stay zero, so pass every row the baselines will be fitted on or asked about. With `folds`
    (the trial's), the intensity statistics take the ANALYSIS_SIZES size that cross-validates best on them
    (fitted on the training folds only); without, the largest."""
    rows = np.arange(len(ds)) if rows is None else np.unique(rows)
    sizes = sorted({min(s, ds.images.shape[-1]) for s in ANALYSIS_SIZES})
    if not folds:
        sizes = sizes[-1:]
    candidates = [Baseline("intensity", _intensity_at(ds, rows, s), s) for s in sizes]
    best = candidates[0] if len(candidates) == 1 else max(candidates, key=lambda b: _cv_score(b, ds.labels, folds or []))
    out = [best]
    meta = metadata_features(ds)
    if meta is not None:
        out.append(Baseline("metadata", meta))
    return out


def out_of_fold(b: Baseline, labels: np.ndarray, folds: list[Fold]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, log-probs) of every validation image, each from the model fitted on its own training fold."""
    idx, lp = [], []
    for f in folds:
        model = b.fit(f.train, labels)
        idx.append(f.val)
        lp.append(b.log_probs(model, f.val))
    return np.concatenate(idx), np.concatenate(lp)


def fold_records(ds: Dataset, folds: list[Fold], baselines: list[Baseline]) -> list[dict[str, float]]:
    """Per fold: `baseline/<name>/val/...` (acc, bal_acc, f1, min_recall) of each baseline fitted on that fold."""
    per_fold: list[dict[str, float]] = [{} for _ in folds]
    for b in baselines:
        for k, f in enumerate(folds):
            pred = b.log_probs(b.fit(f.train, ds.labels), f.val).argmax(1)
            y = ds.labels[f.val]
            m = class_metrics(y, pred) | {"val/acc": float((pred == y).mean())}
            per_fold[k] |= {f"baseline/{b.name}/{name}": m[name] for name in BASELINE_METRICS}
    return per_fold
