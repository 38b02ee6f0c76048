"""Package bootstrap: intervals for held-out figures when scans of one package move together.

Scans of one physical package share its geometry, metallization and delamination history, so they
are not independent draws: resampling scans would give intervals that are too narrow. Every
interval here resamples *packages* with replacement (each keeps all its scans) and recomputes the
figure on the resample; the interval is the percentile interval of those figures.

Fast by construction: per package, the confusion matrix (or hit count) is computed once; a
resample's confusion matrix is then a weighted sum, `W @ per_package` with W the (n_boot, n_pkg)
draw counts, so 2000 resamples of a few hundred scans take milliseconds.

A **paired** difference (model a minus model b on the same scans) uses the same resamples for both,
so what the two models share (hard packages, easy packages) cancels: its interval is the one to read
when asking "is a better than b?".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
MIN_PACKAGES = 5  # fewer packages than this: resamples cannot show the noise; intervals are NaN (outcome "tied")
METRICS = ("acc", "bal_acc", "f1")  # the held-out figures that get intervals, besides per-class recall


@dataclass(frozen=True)
class Interval:
    value: float  # on the data as they are
    lo: float  # percentile interval over package resamples
    hi: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    def text(self, digits: int = 3, signed: bool = False) -> str:
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        return f"{f.format(self.value)} [{f.format(self.lo)}, {f.format(self.hi)}]"


def package_draws(groups: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(codes, W): each scan's package index (0..P-1) and W (n_boot, P), how often each package is drawn
    in each resample (P draws with replacement, so every row sums to P)."""
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_pkg = int(codes.max()) + 1 if len(codes) else 0
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n_pkg, np.full(n_pkg, 1.0 / max(n_pkg, 1)), size=n_boot).astype(np.float64)
    return codes, w


def confusion_by_package(y: np.ndarray, pred: np.ndarray, codes: np.ndarray, n_pkg: int, k: int,
                         weights: np.ndarray | None = None) -> np.ndarray:
    """(P, k*k) per-package confusion counts, row = true class; with `weights`, each scan counts its weight."""
    cm = np.zeros((n_pkg, k * k))
    w = 1.0 if weights is None else np.asarray(weights, np.float64)
    np.add.at(cm, (codes, np.asarray(y) * k + np.asarray(pred)), w)
    return cm


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """acc, bal_acc, f1 (macro) and recall_<i> for (..., k, k) confusion counts (row = true class).

    A class absent from a resample has no recall: it is NaN and left out of balanced accuracy (as
    scikit-learn's balanced_accuracy_score does); macro-F1 leaves out only a class neither present nor
    predicted (as f1_score(average="macro", zero_division=0) without `labels` does); a class never
    predicted has precision 0.
    """
    k = cm.shape[-1]
    diag = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(-1)
    predicted = cm.sum(-2)
    total = cm.sum((-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, diag / support, np.nan)
        precision = np.where(predicted > 0, diag / np.where(predicted > 0, predicted, 1), 0.0)
        denom = precision + np.nan_to_num(recall)
        f1 = np.where(denom > 0, 2 * precision * np.nan_to_num(recall) / np.where(denom > 0, denom, 1), 0.0)
        f1 = np.where((support > 0) | (predicted > 0), f1, np.nan)
        out = {
            "acc": diag.sum(-1) / total,
            "bal_acc": np.nanmean(recall, axis=-1),
            "f1": np.nanmean(f1, axis=-1),
        }
    for i in range(k):
        out[f"recall_{i}"] = recall[..., i]
    return out


def _interval(value: float, samples: np.ndarray, level: float, n_packages: int | None = None) -> Interval:
    s = samples[np.isfinite(samples)]
    if len(s) == 0 or (n_packages is not None and n_packages < MIN_PACKAGES):
        return Interval(float(value), float("nan"), float("nan"))
    a = (1 - level) / 2
    lo, hi = np.quantile(s, [a, 1 - a])
    return Interval(float(value), float(lo), float(hi))


def classification_intervals(
    y: np.ndarray, pred: np.ndarray, groups: np.ndarray, n_classes: int,
    n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
) -> dict[str, Interval]:
    """Intervals for accuracy, balanced accuracy, macro-F1 and each class's recall (`recall_<i>`)."""
    codes, w = package_draws(groups, n_boot, seed)
    per_pkg = confusion_by_package(y, pred, codes, w.shape[1], n_classes)
    point = metrics_from_confusion(per_pkg.sum(0).reshape(n_classes, n_classes))
    boot = metrics_from_confusion((w @ per_pkg).reshape(n_boot, n_classes, n_classes))
    with np.errstate(invalid="ignore"):
        return {name: _interval(float(point[name]), boot[name], level, w.shape[1]) for name in point}


def paired_difference(
    y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, groups: np.ndarray, n_classes: int,
    n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
) -> dict[str, Interval]:
    """Intervals for metric(a) - metric(b) on the same scans, both recomputed on the same package resamples."""
    codes, w = package_draws(groups, n_boot, seed)
    per_a = confusion_by_package(y, pred_a, codes, w.shape[1], n_classes)
    per_b = confusion_by_package(y, pred_b, codes, w.shape[1], n_classes)
    shape = (n_classes, n_classes)
    pa, pb = metrics_from_confusion(per_a.sum(0).reshape(shape)), metrics_from_confusion(per_b.sum(0).reshape(shape))
    ba = metrics_from_confusion((w @ per_a).reshape(n_boot, *shape))
    bb = metrics_from_confusion((w @ per_b).reshape(n_boot, *shape))
    with np.errstate(invalid="ignore"):
        return {name: _interval(float(pa[name] - pb[name]), ba[name] - bb[name], level, w.shape[1])
                for name in METRICS}


def metric_draws(
    y: np.ndarray, preds: list[np.ndarray], groups: np.ndarray, n_classes: int, weights: np.ndarray | None = None,
    n_boot: int = N_BOOT, seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """For each prediction vector, its metrics on the SAME package resamples ((n_boot,) arrays per metric), each
    scan counted with its weight (e.g. prior / pool share, to score a balanced set at the natural class mix).
    Differences of two entries are paired: what the predictions share (hard packages, easy packages) cancels."""
    codes, w = package_draws(groups, n_boot, seed)
    shape = (n_boot, n_classes, n_classes)
    return [metrics_from_confusion((w @ confusion_by_package(y, p, codes, w.shape[1], n_classes, weights)).reshape(shape))
            for p in preds]


def rate_interval(
    hits: np.ndarray, groups: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
) -> Interval:
    """A hit rate (mean of 0/1 or of fractions per scan) with its package-bootstrap interval."""
    hits = np.asarray(hits, np.float64)
    if len(hits) == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    codes, w = package_draws(groups, n_boot, seed)
    s = np.bincount(codes, hits, minlength=w.shape[1])
    n = np.bincount(codes, minlength=w.shape[1]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _interval(float(hits.mean()), (w @ s) / (w @ n), level, w.shape[1])


def paired_rate_difference(
    hits_a: np.ndarray, hits_b: np.ndarray, groups: np.ndarray,
    n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
) -> Interval:
    """mean(a) - mean(b) for two hit vectors on the same scans, with a paired package-bootstrap interval."""
    d = np.asarray(hits_a, np.float64) - np.asarray(hits_b, np.float64)
    return rate_interval(d, groups, n_boot, seed, level)


def verdict(diff: Interval) -> str:
    """'beats', 'tied' or 'loses': whether the interval of a paired difference lies above, around or below 0."""
    if not np.isfinite(diff.lo) or not np.isfinite(diff.hi):
        return "tied"
    if diff.lo > 0:
        return "beats"
    if diff.hi < 0:
        return "loses"
    return "tied"
