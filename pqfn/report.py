"""Files a user reads: metrics CSVs, learning-curve and gap plots, held-out evaluation (JSON, PNG).

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written file in place of a good one.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from pqfn.config import CLASS_NAMES, CLASSES
from pqfn.data import Dataset
from pqfn.metrics import FOLD_METRICS, fold_key


def atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.replace(path)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write(path, buf.getvalue())


def metrics_rows(history: list[dict[str, float]], folds: int) -> list[dict[str, Any]]:
    """One row per epoch and fold, plus a 'mean' and a 'std' row per epoch."""
    rows = []
    for rec in history:
        e = int(rec["epoch"])
        for k in range(1, folds + 1):
            rows.append({"epoch": e, "fold": k} | {m: rec[fold_key(k, m)] for m in FOLD_METRICS})
        rows.append({"epoch": e, "fold": "mean"} | {m: rec[m] for m in FOLD_METRICS})
        rows.append({"epoch": e, "fold": "std"} | {m: rec[f"{m}_std"] for m in FOLD_METRICS})
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    buf = io.StringIO()
    cols = columns or (list(rows[0]) if rows else [])
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(path, buf.getvalue())


def write_metrics_csv(path: Path, history: list[dict[str, float]], folds: int) -> None:
    write_csv(path, metrics_rows(history, folds), ["epoch", "fold", *FOLD_METRICS])


def plot_curves(path: Path, history: list[dict[str, float]], title: str) -> None:
    """Accuracy, loss and both gaps per epoch (mean across folds, band = +-1 std)."""
    plt = _plt()
    ep = np.array([r["epoch"] for r in history])
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = [
        (axes[0, 0], ["train/acc", "val/acc"], "accuracy"),
        (axes[0, 1], ["train/loss", "val/loss"], "cross-entropy loss"),
        (axes[1, 0], ["gap/acc"], "gap/acc = train/acc - val/acc"),
        (axes[1, 1], ["gap/loss"], "gap/loss = val/loss - train/loss"),
    ]
    for ax, keys, ylabel in panels:
        for key in keys:
            m = np.array([r[key] for r in history])
            s = np.array([r[f"{key}_std"] for r in history])
            ax.plot(ep, m, marker="o", label=f"{key} (mean of folds)")
            ax.fill_between(ep, m - s, m + s, alpha=0.2)
        if key.startswith("gap"):
            ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    fig.suptitle(f"{title}\n(positive gap = overfitting; band = +-1 std across folds)")
    save_fig(fig, path)


def write_evaluation(out_dir: Path, metrics: dict[str, Any], ds: Dataset, test: np.ndarray, pred: np.ndarray) -> None:
    atomic_write(out_dir / "evaluation.json", json.dumps(metrics, indent=2))
    write_csv(
        out_dir / "predictions.csv",
        [
            {"path": ds.paths[i], "package_id": ds.package_ids[i], "metallization": ds.metallization[i],
             "cycles": int(ds.cycles[i]), "label": CLASSES[ds.labels[i]], "predicted": CLASSES[p]}
            for i, p in zip(test, pred, strict=True)
        ],
    )
    plot_confusion(out_dir / "confusion.png", metrics)
    if metrics.get("by_metallization_cycles"):
        write_csv(out_dir / "by_metallization_cycles.csv", metrics["by_metallization_cycles"])
        plot_delamination_map(out_dir / "by_metallization_cycles.png", metrics["by_metallization_cycles"])


def plot_confusion(path: Path, metrics: dict[str, Any], title: str = "Held-out test packages") -> None:
    plt = _plt()
    cm = np.array(metrics["confusion_matrix"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 1.2]})
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), [f"{c}: {CLASS_NAMES[c]}" for c in CLASSES], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix ({metrics['n_test_images']} images)")
    pc = metrics["per_class"]
    x = np.arange(len(CLASSES))
    ax2.bar(x - 0.2, [pc[c]["precision"] for c in CLASSES], 0.4, label="precision")
    ax2.bar(x + 0.2, [pc[c]["recall"] for c in CLASSES], 0.4, label="recall")
    ax2.set_xticks(x, [f"{c} (n={pc[c]['support']})" for c in CLASSES])
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("score")
    ax2.set_title(f"macro precision {metrics['macro_precision']:.2f}, macro recall {metrics['macro_recall']:.2f}")
    ax2.legend()
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title}: accuracy {metrics['accuracy']:.2f}")
    save_fig(fig, path)


def plot_delamination_map(path: Path, table: list[dict[str, Any]]) -> None:
    """Heatmap: share of test scans predicted delaminated, by metallization (rows) and cycles (columns)."""
    plt = _plt()
    metals = sorted({r["metallization"] for r in table})
    cycles = sorted({r["cycles"] for r in table})
    grid = np.full((len(metals), len(cycles)), np.nan)
    truth = np.full_like(grid, np.nan)
    for r in table:
        i, j = metals.index(r["metallization"]), cycles.index(r["cycles"])
        grid[i, j], truth[i, j] = r["predicted_delaminated"], r["true_delaminated"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(cycles), 1.5 + 0.7 * len(metals)))
    im = ax.imshow(grid, cmap="magma", vmin=0, vmax=1, aspect="auto")
    for i in range(len(metals)):
        for j in range(len(cycles)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}\n({truth[i, j]:.2f})", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(cycles)), [str(c) for c in cycles])
    ax.set_yticks(range(len(metals)), metals)
    ax.set_xlabel("thermal cycles")
    ax.set_ylabel("metallization")
    fig.colorbar(im, ax=ax, label="share predicted delaminated (A, B or C)")
    ax.set_title("Predicted delamination on held-out packages\n(true share in brackets)")
    save_fig(fig, path)
