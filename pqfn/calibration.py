"""Calibration of predicted class probabilities: expected calibration error and a reliability diagram.

Top-label calibration (Guo et al. 2017): each prediction's confidence is its largest class probability;
predictions are grouped into `n_bins` equal-width confidence bins ((m-1)/M, m/M] (the first bin also takes
0), and ECE = sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|. 0 is perfect;
a model that says 0.9 and is right half the time contributes 0.4 for those predictions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _check(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, y = np.asarray(probs, np.float64), np.asarray(y)
    if probs.ndim != 2 or len(probs) != len(y) or len(y) == 0:
        raise ValueError(f"expected probs (N, classes) and y (N,) with N > 0, got {probs.shape} and {y.shape}")
    return probs, y


def reliability_table(probs: np.ndarray, y: np.ndarray, n_bins: int = 10) -> list[dict[str, Any]]:
    """Per confidence bin: its bounds, count, mean confidence and accuracy (None for an empty bin)."""
    probs, y = _check(probs, y)
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        rows.append({
            "lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n,
            "confidence": float(conf[sel].mean()) if n else None,
            "accuracy": float(correct[sel].mean()) if n else None,
        })
    return rows


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE in [0, 1] (module docstring)."""
    rows = reliability_table(probs, y, n_bins)
    total = sum(r["n"] for r in rows)
    return float(sum(r["n"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows if r["n"]))


def brier_score(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean over predictions of the squared distance between the probability vector and the one-hot truth."""
    probs, y = _check(probs, y)
    onehot = np.eye(probs.shape[1])[y]
    return float(((probs - onehot) ** 2).sum(1).mean())


def plot_reliability(path: Path | str, probs: np.ndarray | Mapping[str, np.ndarray], y: np.ndarray,
                     n_bins: int = 10, title: str = "Reliability diagram") -> None:
    """Accuracy against confidence per bin (one line per named probability set, e.g. raw and prior-adjusted),
    the diagonal of perfect calibration, ECE in the legend, and the share of predictions per bin below."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    sets = {"model": probs} if isinstance(probs, np.ndarray) else dict(probs)
    fig = Figure(figsize=(5.2, 6.0))
    ax, hist = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    width = 1.0 / n_bins / max(len(sets), 1)
    for k, (name, p) in enumerate(sets.items()):
        rows = reliability_table(p, y, n_bins)
        full = [r for r in rows if r["n"]]
        ece = expected_calibration_error(p, y, n_bins)
        ax.plot([r["confidence"] for r in full], [r["accuracy"] for r in full], marker="o",
                label=f"{name} (ECE {ece:.3f})")
        total = sum(r["n"] for r in rows)
        hist.bar([r["lo"] + (k + 0.5) * width for r in rows], [r["n"] / total for r in rows], width=width, label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in bin", title=title)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="confidence (largest class probability)", ylabel="share")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
