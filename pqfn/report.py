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
from pqfn.metrics import FOLD_METRICS, MEMORY_METRICS, fold_key


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
    rows: list[dict[str, Any]] = []
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


# ---------------------------------------------------------------- sweep outputs
TRIAL_METRICS = ["train/acc", "val/acc", "gap/acc", "train/loss", "val/loss", "gap/loss", "val/bal_acc", "objective"]


def trial_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    params = sorted({k for r in rows for k in r["params"]})
    cols = ["trial_id", "status", *params, "epoch", *TRIAL_METRICS, "time_total_s", *MEMORY_METRICS, "node_ip",
            "node_id", "restored_from", "error"]
    # Parameters are written exactly (str of a float is its shortest exact repr); metrics to 6 digits.
    flat = [{k: v for k, v in r.items() if k not in ("params", "metrics")} | {k: str(v) for k, v in r["params"].items()}
            for r in rows]
    return cols, flat


def read_trials_csv(path: Path) -> list[dict[str, Any]]:
    """trials.csv -> rows as the selection expects them (params under 'params', floats parsed)."""
    rows = []
    with path.open(newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {"trial_id": raw["trial_id"], "status": raw["status"], "params": {}}
            for k, v in raw.items():
                if k.startswith("trial."):
                    row["params"][k] = _num(v)
                elif k not in ("trial_id", "status", "node_ip", "node_id", "error"):
                    row[k] = _num(v)
            rows.append(row)
    return rows


def _num(v: str) -> Any:
    for t in (int, float):
        try:
            return t(v)
        except (TypeError, ValueError):
            pass
    return v


def plot_pareto(path: Path, rows: list[dict[str, Any]], selection: dict[str, Any]) -> None:
    plt = _plt()
    gm = selection["rule"]["gap_metric"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"completed": ("o", "tab:blue"), "stopped": ("x", "tab:grey"), "failed": ("s", "tab:red")}
    for status, (marker, color) in styles.items():
        pts = [r for r in rows if r["status"] == status and np.isfinite(r.get("val/acc", np.nan))]
        if pts:
            ax.scatter([r["val/acc"] for r in pts], [r[gm] for r in pts], marker=marker, color=color,
                       label=f"{status} ({len(pts)})", alpha=0.8)
    front = selection["pareto_front"]
    if front:
        ax.plot([p["val/acc"] for p in front], [p[gm] for p in front], "--", color="tab:blue", lw=1, label="Pareto front")
    rule = selection["rule"]
    if rule.get("floor") is not None:
        ax.axvline(rule["floor"], color="tab:red", ls=":", lw=1, label=f"val/acc floor {rule['floor']}")
    if selection.get("best_val_acc") is not None and rule.get("tolerance") is not None:
        ax.axvline(selection["best_val_acc"] - rule["tolerance"], color="tab:orange", ls=":", lw=1,
                   label=f"best - tolerance {rule['tolerance']}")
    if selection["selected"] is not None:
        s = selection["selected"]
        ax.scatter([s["val/acc"]], [s[gm]], marker="*", s=300, color="gold", edgecolor="k", zorder=5, label="selected")
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(0.25, color="k", lw=0.6, ls="--")
    ax.text(0.25, ax.get_ylim()[1], " chance", va="top", fontsize=8)
    ax.set_xlabel("mean validation accuracy (val/acc)")
    ax.set_ylabel(f"{gm} (positive = overfitting)")
    ax.set_title("Trials: accuracy against overfitting gap")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_fig(fig, path)


def plot_gap_by_axis(path: Path, rows: list[dict[str, Any]], gap_metric: str) -> None:
    """Gap against each searched axis (the study's Fig. 6): completed trials, mean and spread."""
    plt = _plt()
    done = [r for r in rows if r["status"] == "completed"]
    axes_keys = sorted({k for r in rows for k in r["params"]})
    n = max(1, len(axes_keys))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    for ax, key in zip(axes[0], axes_keys or ["(no axis)"], strict=False):
        vals = sorted({r["params"][key] for r in done if key in r["params"]}, key=lambda v: (str(type(v)), v))
        xs = np.arange(len(vals)) if any(isinstance(v, str) for v in vals) else np.array(vals, dtype=float)
        for x, v in zip(xs, vals, strict=True):
            g = [r[gap_metric] for r in done if r["params"].get(key) == v]
            ax.scatter([x] * len(g), g, color="tab:blue", alpha=0.5)
            ax.errorbar([x], [np.mean(g)], yerr=[np.std(g)] if len(g) > 1 else None, fmt="o", color="k", capsize=4)
        ax.set_xlabel(key.split(".", 1)[-1].replace("_", " "))
        ax.set_ylabel(f"{gap_metric} (mean of folds)")
        ax.axhline(0, color="k", lw=0.8)
        ax.grid(alpha=0.3)
        if len(xs):
            ax.set_xticks(xs, [str(v) for v in vals])
    fig.suptitle("Overfitting gap by search axis (dots: trials; black: mean +- std)")
    save_fig(fig, path)


def write_sweep_outputs(sdir: Path, cfg: Any, rows: list[dict[str, Any]], data: Dataset, holdout: Any,
                        log: Any = print) -> dict[str, Any]:
    """trials.csv, selection.json, plots; then the held-out evaluation of the selection (if enabled)."""
    from pqfn.config import with_overrides
    from pqfn.evaluate import evaluate_holdout
    from pqfn.selection import select

    cols, flat = trial_table(rows)
    write_csv(sdir / "trials.csv", flat, cols)
    sel = select(rows, cfg.selection.gap_metric, cfg.selection.tolerance, cfg.selection.floor)
    atomic_write(sdir / "selection.json", json.dumps(sel, indent=2, default=float))
    plot_pareto(sdir / "pareto.png", rows, sel)
    plot_gap_by_axis(sdir / "gap_by_axis.png", rows, cfg.selection.gap_metric)
    summary: dict[str, Any] = {"folder": str(sdir), "selection": sel, "evaluation": None}
    if sel["selected"] is not None and cfg.evaluate.enabled:
        final = sdir / "final"
        done = final / "evaluation.json"
        params = sel["selected"]["params"]
        if done.exists() and json.loads(done.read_text()).get("params") == params:
            summary["evaluation"] = json.loads(done.read_text())
        else:
            tc = with_overrides(cfg, params).trial
            m = evaluate_holdout(tc, data, holdout, final, log=log)
            m["params"] = params
            atomic_write(done, json.dumps(m, indent=2))
            summary["evaluation"] = m
    return summary


def regenerate(run_dir: Path) -> None:
    """`pqfn report RUN_DIR`: rebuild selection.json and the plots from trials.csv (no Ray, no W&B)."""
    from pqfn.config import load_config
    from pqfn.errors import PqfnError
    from pqfn.selection import select

    if not (run_dir / "trials.csv").exists():
        raise PqfnError(f"{run_dir}: no trials.csv; expected a sweep results folder")
    cfg = load_config(run_dir / "config.yaml")
    rows = read_trials_csv(run_dir / "trials.csv")
    sel = select(rows, cfg.selection.gap_metric, cfg.selection.tolerance, cfg.selection.floor)
    atomic_write(run_dir / "selection.json", json.dumps(sel, indent=2, default=float))
    plot_pareto(run_dir / "pareto.png", rows, sel)
    plot_gap_by_axis(run_dir / "gap_by_axis.png", rows, cfg.selection.gap_metric)
    ev = run_dir / "final" / "evaluation.json"
    if ev.exists():
        plot_confusion(run_dir / "final" / "confusion.png", json.loads(ev.read_text()))
    print(f"rewrote {run_dir}/selection.json, pareto.png, gap_by_axis.png" + (", final/confusion.png" if ev.exists() else ""))
