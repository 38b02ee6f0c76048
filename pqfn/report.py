"""Files a user reads: metrics CSVs, learning-curve and gap plots, held-out evaluation (JSON, PNG).

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written file in place of a good one.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pqfn.config import CLASS_NAMES, CLASSES, Config
from pqfn.data import Dataset
from pqfn.metrics import FOLD_METRICS, MEMORY_METRICS, TRIAL_METRICS, fold_columns, fold_key
from pqfn.records import Selection, SweepResult, TrialOutcome


def atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.replace(path)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
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
    plt = pyplot()
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


def write_evaluation(out_dir: Path, metrics: dict[str, Any], ds: Dataset, test: np.ndarray, probs: np.ndarray,
                     raw_probs: np.ndarray) -> None:
    """evaluation.json, predictions.csv (one row per held-out image, with the prior-corrected and the raw
    class probabilities), confusion.png and the metallization x cycles map."""
    atomic_write(out_dir / "evaluation.json", json.dumps(metrics, indent=2))
    pred = probs.argmax(1)
    write_csv(
        out_dir / "predictions.csv",
        [
            {"path": ds.paths[i], "package_id": str(ds.package_ids[i]), "metallization": str(ds.metallization[i]),
             "cycles": int(ds.cycles[i]), "label": CLASSES[ds.labels[i]], "predicted": CLASSES[p]}
            | {f"prob_{c}": float(probs[n, k]) for k, c in enumerate(CLASSES)}
            | {f"raw_prob_{c}": float(raw_probs[n, k]) for k, c in enumerate(CLASSES)}
            for n, (i, p) in enumerate(zip(test, pred, strict=True))
        ],
    )
    plot_confusion(out_dir / "confusion.png", metrics)
    if metrics.get("by_metallization_cycles"):
        write_csv(out_dir / "by_metallization_cycles.csv", metrics["by_metallization_cycles"])
        plot_delamination_map(out_dir / "by_metallization_cycles.png", metrics["by_metallization_cycles"])


def plot_confusion(path: Path, metrics: dict[str, Any], title: str = "Held-out test packages") -> None:
    plt = pyplot()
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
    plt = pyplot()
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
OUTCOME_FIELDS = ("trial_id", "status", "epoch", "time_total_s", "node_ip", "node_id", "restored_from", "error")


def trial_table(rows: list[TrialOutcome]) -> tuple[list[str], list[dict[str, Any]]]:
    """trials.csv's columns and rows: identity and status, the searched parameters, the final metrics."""
    params = sorted({k for r in rows for k in r.params})
    folds = fold_columns(max((int(n) for r in rows if (n := r.get("n_folds")) >= 1), default=0))
    cols = ["trial_id", "status", *params, "epoch", *TRIAL_METRICS, "time_total_s", *MEMORY_METRICS, "node_ip",
            "node_id", "restored_from", "error", *folds]
    # Parameters are written exactly (str of a float is its shortest exact repr); metrics to 6 digits.
    flat = [{k: getattr(r, k) for k in OUTCOME_FIELDS} | {k: r.get(k) for k in (*TRIAL_METRICS, *MEMORY_METRICS, *folds)}
            | {k: str(v) for k, v in r.params.items()} for r in rows]
    return cols, flat


def read_trials_csv(path: Path) -> list[TrialOutcome]:
    """trials.csv -> typed outcomes (what `pqfn report` re-selects from).

    A binary, truncated, ragged or hand-damaged file is one PqfnError naming the file and line.
    """
    import math

    from pqfn.errors import PqfnError
    from pqfn.io import read_csv
    from pqfn.records import STATUSES

    table = read_csv(path, "trials.csv", required=("trial_id", "status"), expected="the table a sweep writes")
    rows = []
    for line, raw in table:
        where = f"{path} line {line}"

        def number(key: str, default: float, where: str = where, raw: dict[str, str] = raw) -> float:
            v = (raw.get(key) or "").strip()
            try:
                return float(v) if v else default  # an empty cell: never reported (NaN for metrics)
            except ValueError:
                raise PqfnError(f"{where}: column {key}: {v!r} is not a number") from None

        status = raw["status"].strip()
        if status not in STATUSES:
            raise PqfnError(f"{where}: status {status!r} is not one of {', '.join(STATUSES)}")
        epoch = number("epoch", 0.0)
        if not math.isfinite(epoch) or epoch < 0:
            raise PqfnError(f"{where}: column epoch: {raw.get('epoch')!r} is not an epoch number")
        rows.append(TrialOutcome(
            trial_id=raw["trial_id"].strip(), status=status,  # type: ignore[arg-type]
            params={k: _num(v) for k, v in raw.items() if k.startswith("trial.")},
            metrics={k: number(k, math.nan) for k in raw
                     if k in TRIAL_METRICS or k in MEMORY_METRICS or k.startswith("fold")},
            epoch=int(epoch), time_total_s=number("time_total_s", 0.0),
            node_ip=raw.get("node_ip") or "", node_id=raw.get("node_id") or "",
            restored_from=number("restored_from", 0.0), error=raw.get("error") or "",
        ))
    return rows


def _num(v: str) -> Any:
    for t in (int, float):
        try:
            return t(v)
        except (TypeError, ValueError):
            pass
    return v


def write_sweep(sdir: Path, cfg: Config, rows: list[TrialOutcome], selection: Selection) -> None:
    """trials.csv, selection.json and the plots (also what `pqfn report` rewrites)."""
    cols, flat = trial_table(rows)
    write_csv(sdir / "trials.csv", flat, cols)
    atomic_write(sdir / "selection.json", json.dumps(selection.as_dict(), indent=2, default=float))
    plot_pareto(sdir / "pareto.png", rows, selection)
    plot_gap_by_axis(sdir / "gap_by_axis.png", rows, cfg.selection.gap_metric)


def plot_pareto(path: Path, rows: list[TrialOutcome], selection: Selection) -> None:
    """Every trial in (selection metric, gap); error bars = 1 standard error; the tied trials ringed."""
    plt = pyplot()
    rule = selection.rule
    m, gm = rule["metric"], rule["gap_metric"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"completed": ("o", "tab:blue"), "stopped": ("x", "tab:grey"), "failed": ("s", "tab:red")}
    for status, (marker, color) in styles.items():
        pts = [r for r in rows if r.status == status and np.isfinite(r.get(m))]
        if pts:
            ax.errorbar([r.get(m) for r in pts], [r.get(gm) for r in pts],
                        xerr=[np.nan_to_num(r.se(m)) for r in pts], yerr=[np.nan_to_num(r.se(gm)) for r in pts],
                        fmt=marker, color=color, label=f"{status} ({len(pts)})", alpha=0.8, capsize=2, lw=0.8)
    front = selection.pareto_front
    if front:
        ax.plot([p[m] for p in front], [p[gm] for p in front], "--", color="tab:blue", lw=1, label="Pareto front")
    if rule.get("floor") is not None:
        ax.axvline(rule["floor"], color="tab:red", ls=":", lw=1, label=f"{m} floor {rule['floor']}")
    if selection.tied:
        ax.scatter([t[m] for t in selection.tied], [t[gm] for t in selection.tied], s=160, facecolors="none",
                   edgecolors="tab:orange", lw=1.5, label=f"tied with the winner ({len(selection.tied)})", zorder=4)
    if selection.selected is not None:
        s = selection.selected
        ax.scatter([s[m]], [s[gm]], marker="*", s=300, color="gold", edgecolor="k", zorder=5, label="selected")
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(0.25, color="k", lw=0.6, ls="--")
    ax.text(0.25, ax.get_ylim()[1], " chance", va="top", fontsize=8)
    ax.set_xlabel(f"{m} (mean of folds, +- 1 standard error)")
    ax.set_ylabel(f"{gm} (positive = overfitting)")
    ax.set_title("Trials: class-balanced validation score against overfitting gap")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_fig(fig, path)


def plot_gap_by_axis(path: Path, rows: list[TrialOutcome], gap_metric: str) -> None:
    """Gap against each searched axis (the study's Fig. 6): completed trials, mean and spread."""
    plt = pyplot()
    done = [r for r in rows if r.status == "completed"]
    axes_keys = sorted({k for r in rows for k in r.params})
    n = max(1, len(axes_keys))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    for ax, key in zip(axes[0], axes_keys or ["(no axis)"], strict=False):
        vals = sorted({r.params[key] for r in done if key in r.params}, key=lambda v: (str(type(v)), v))
        xs = np.arange(len(vals)) if any(isinstance(v, str) for v in vals) else np.array(vals, dtype=float)
        for x, v in zip(xs, vals, strict=True):
            g = [r.get(gap_metric) for r in done if r.params.get(key) == v]
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


def _iv(d: dict[str, float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(d['value'])} [{f.format(d['lo'])}, {f.format(d['hi'])}]"


def baseline_lines(ev: dict[str, Any]) -> list[str]:
    """The held-out comparison with the cheap baselines, each figure with its package-bootstrap interval."""
    lines = []
    iv = ev.get("intervals")
    if iv:
        lines.append(f"  with {ev.get('versus_baseline', {}).get('level', 0.95):.0%} package-bootstrap intervals: CNN "
                     f"balanced accuracy {_iv(iv['balanced_accuracy'])}, macro-F1 {_iv(iv['macro_f1'])}, "
                     f"accuracy {_iv(iv['accuracy'])}")
    for c in ev.get("cheap_baselines", {}).values():
        ci = c["intervals"]
        lines.append(f"  cheap baseline {c['description']}: balanced accuracy {_iv(ci['balanced_accuracy'])}, "
                     f"macro-F1 {_iv(ci['macro_f1'])}, accuracy {_iv(ci['accuracy'])} "
                     f"(cross-validated balanced accuracy {c['cv_balanced_accuracy']:.3f})")
    vb = ev.get("versus_baseline")
    if vb:
        d = vb["difference"]
        lines.append(f"  CNN minus {vb['description']} (paired by package): balanced accuracy "
                     f"{_iv(d['balanced_accuracy'], True)}, macro-F1 {_iv(d['macro_f1'], True)}, "
                     f"accuracy {_iv(d['accuracy'], True)}: {vb['outcome']}")
    for name, f in ev.get("findings", {}).items():
        base = (f" vs best cheap baseline {_iv(f['baseline']['accuracy'])} (difference "
                f"{_iv(f['cnn_minus_baseline_accuracy'], True)}: {f['cnn_minus_baseline_accuracy']['outcome']})"
                if "baseline" in f else "")
        lines.append(f"  {name.replace('_', '-')} delamination ({'/'.join(f['classes'])}) found right: CNN "
                     f"{_iv(f['cnn']['accuracy'])} (sensitivity {_iv(f['cnn']['sensitivity'])}, specificity "
                     f"{_iv(f['cnn']['specificity'])}){base}")
    lb = ev.get("localisation_baselines")
    if lb:
        maps = (("gradcam", "Grad-CAM"), ("dense_map", "dense map"), ("brightest_pixel", "brightest pixel"),
                ("fixed_location", "fixed location"))
        parts = [f"{label} {_iv(lb[k]['all'])}" for k, label in maps if k in lb]
        calls = "; ".join(f"{label} {v['all']['outcome']} {k.replace('_', ' ')} ({_iv(v['all'], True)})"
                          for who, label in maps[:2] for k, v in lb.get(f"{who}_minus", {}).items())
        lines.append(f"  localisation (peak on the true delamination, {lb['gradcam']['all']['n']} delaminated scans): "
                     + ", ".join(parts) + f"; {calls}")
    return lines


def print_summary(s: SweepResult, log: Callable[[str], None] = print) -> None:
    """The sweep's closing lines: trials, the selection and why, the held-out figures beside the baselines, time."""
    sel = s.selection
    c = sel.counts
    t = s.timing
    log("")
    log(f"trials: {c['completed']} completed, {c['stopped']} stopped early, {c['failed']} failed")
    if sel.selected is None:
        log(f"no configuration selected: {sel.reason}")
    else:
        x = sel.selected
        m = x["metrics"]
        params = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in x["params"].items())
        log(f"selected: {params}")
        log(f"  val/bal_acc {m['val/bal_acc']:.3f} +- {m['val/bal_acc_std']:.3f}, worst class recall "
            f"{m['val/min_recall']:.3f}, val/acc {m['val/acc']:.3f}, gap/acc {m['gap/acc']:+.3f}, "
            f"gap/loss {m['gap/loss']:+.3f} (mean +- std of {int(m['n_folds'])} folds)")
        log(f"  why: {sel.reason}")
        log(f"  rule: {sel.rule['text']}")
        if sel.tied:
            log("  statistically tied: " + "; ".join(
                ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in r["params"].items()) for r in sel.tied))
    ev = s.evaluation
    if ev:
        b = ev["baselines"]
        pc = ev["prior_correction"]
        log(f"held-out test ({ev['n_test_images']} images, {ev['n_test_packages']} packages; {ev['final_model']}, "
            f"prior correction strength {pc['strength']:g}):")
        log(f"  accuracy {ev['accuracy']:.3f} (always-{b['majority_class']}: {b['majority_accuracy']:.3f}), "
            f"balanced accuracy {ev['balanced_accuracy']:.3f} (chance: {b['chance_balanced_accuracy']:.3f}), "
            f"macro-F1 {ev['macro_f1']:.3f} (always-{b['majority_class']}: {b['majority_macro_f1']:.3f})")
        log(f"  macro precision {ev['macro_precision']:.3f}, macro recall {ev['macro_recall']:.3f}; without the prior "
            f"correction: accuracy {ev['raw']['accuracy']:.3f}, balanced accuracy {ev['raw']['balanced_accuracy']:.3f}, "
            f"macro-F1 {ev['raw']['macro_f1']:.3f}")
        for line in baseline_lines(ev):
            log(line)
        log(f"  {ev['verdict']}")
    if t:
        ph = t["phases_s"]
        log(f"time: {t['total_s']:.0f} s in all ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in ph.items())
            + f"); search efficiency {t['search_efficiency']:.0%} ({t['trial_time_sum_s']:.0f} s of trials on "
            f"{t['slots']} slot(s))")
    log(f"results: {s.folder}  (trials.csv, selection.json, pareto.png, gap_by_axis.png, final/)")
