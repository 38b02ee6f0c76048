"""The one metric vocabulary, used identically by the local trial, Tune, W&B and the files on disk.

Per fold k (1-based): `fold{k}/train/acc`, ...; across folds: the mean under the bare name
(`train/acc`) and the standard deviation with `_std` (`train/acc_std`).

gap/acc  = train/acc - val/acc    (positive = overfitting)
gap/loss = val/loss - train/loss  (positive = overfitting; the reference study writes
                                   Training - Validation for both, so its loss gap has the opposite sign)

Per class on the validation fold: `val/recall_A`, `val/precision_A`, ... (scikit-learn, zero when a
class is never predicted), their macro means `val/bal_acc` (= macro recall) and `val/f1` (macro-F1),
and `val/min_recall`, the worst class's recall in that fold: a configuration blind to one class
has val/min_recall near 0 whatever its accuracy.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from pqfn.config import CLASSES

PER_CLASS_METRICS = tuple(f"val/{m}_{c}" for m in ("recall", "precision") for c in CLASSES)
FOLD_METRICS = ("train/acc", "train/loss", "val/acc", "val/loss", "val/bal_acc", "val/f1", "val/min_recall",
                *PER_CLASS_METRICS, "gap/acc", "gap/loss")
# What a trial's row in trials.csv shows (mean of folds; `_std` columns beside the selection's inputs).
# The cheap baselines (pqfn.baselines) fitted on the same folds: their mean figures, and the CNN minus the best
# of them fold by fold (vs_baseline/...: positive = the CNN is better on the same validation images).
BASELINE_COLUMNS = tuple(f"baseline/{b}/val/{m}" for b in ("intensity", "metadata") for m in ("bal_acc", "f1")) + (
    "vs_baseline/val/bal_acc", "vs_baseline/val/bal_acc_std", "vs_baseline/val/f1", "vs_baseline/val/f1_std")
TRIAL_METRICS = ("train/acc", "val/acc", "gap/acc", "train/loss", "val/loss", "gap/loss", "val/bal_acc", "val/f1",
                 "val/min_recall", *PER_CLASS_METRICS, "val/acc_std", "val/bal_acc_std", "val/f1_std",
                 "gap/acc_std", "gap/loss_std", "n_folds", "n_repeats", "objective", *BASELINE_COLUMNS)

# Per-fold values kept in trials.csv beside the means: the selection compares trials that share folds fold by
# fold (paired), and `pqfn report` re-selects from trials.csv.
PAIRED_METRICS = ("val/acc", "val/bal_acc", "val/f1", "val/min_recall", "gap/acc", "gap/loss")


def fold_columns(n_folds: int) -> list[str]:
    """trials.csv's per-fold columns for up to n_folds folds: fold1/val/bal_acc, ..."""
    return [fold_key(k, m) for k in range(1, n_folds + 1) for m in PAIRED_METRICS]


def class_metrics(y: np.ndarray, pred: np.ndarray, prefix: str = "val") -> dict[str, float]:
    """Per-class recall and precision, balanced accuracy, macro-F1 and the worst recall of one fold."""
    p, r, f, _ = precision_recall_fscore_support(y, pred, labels=list(range(len(CLASSES))), zero_division=0)
    out = {f"{prefix}/recall_{c}": float(r[i]) for i, c in enumerate(CLASSES)}
    out |= {f"{prefix}/precision_{c}": float(p[i]) for i, c in enumerate(CLASSES)}
    out[f"{prefix}/bal_acc"] = float(r.mean())
    out[f"{prefix}/f1"] = float(f.mean())
    out[f"{prefix}/min_recall"] = float(r.min())
    return out


def fold_key(fold: int, metric: str) -> str:
    return f"fold{fold}/{metric}"


def with_gaps(m: dict[str, float]) -> dict[str, float]:
    out = dict(m)
    out["gap/acc"] = m["train/acc"] - m["val/acc"]
    out["gap/loss"] = m["val/loss"] - m["train/loss"]
    return out


def aggregate(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """Flat record: every fold's metrics, then the mean and std across folds.

    The mean gap equals the difference of the mean train and val metrics (gaps are linear).
    """
    rec: dict[str, float] = {}
    for k, m in enumerate(per_fold, start=1):
        for name in FOLD_METRICS:
            rec[fold_key(k, name)] = float(m[name])
    for name in FOLD_METRICS:
        vals = np.array([m[name] for m in per_fold], dtype=np.float64)
        rec[name] = float(vals.mean())
        rec[f"{name}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    rec["n_folds"] = float(len(per_fold))  # standard error of a mean = its _std / sqrt(n_folds)
    return rec


def aggregate_keys(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """Like aggregate, for whatever keys the folds share (the cheap baselines' figures): fold{k}/key, mean, _std."""
    rec: dict[str, float] = {}
    keys = [k for k in per_fold[0] if all(k in m for m in per_fold)] if per_fold else []
    for k, m in enumerate(per_fold, start=1):
        rec |= {fold_key(k, name): float(m[name]) for name in keys}
    for name in keys:
        vals = np.array([m[name] for m in per_fold], dtype=np.float64)
        rec[name] = float(vals.mean())
        rec[f"{name}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    return rec


def versus_baseline(per_fold: list[dict[str, float]], baseline_folds: list[dict[str, float]]) -> dict[str, float]:
    """The CNN minus the best cheap baseline (best mean val/bal_acc across folds), fold by fold (paired: same
    folds, same validation images): `vs_baseline/val/bal_acc` and `vs_baseline/val/f1`, per fold, mean and _std."""
    names = sorted({k.split("/")[1] for k in baseline_folds[0]}) if baseline_folds and baseline_folds[0] else []
    if not names:
        return {}
    best = max(names, key=lambda n: np.mean([b[f"baseline/{n}/val/bal_acc"] for b in baseline_folds]))
    diffs = [{f"vs_baseline/{m}": cnn[m] - b[f"baseline/{best}/{m}"] for m in ("val/bal_acc", "val/f1")}
             for cnn, b in zip(per_fold, baseline_folds, strict=True)]
    return aggregate_keys(diffs)


MEMORY_METRICS = ("mem/rss_mb", "mem/private_mb", "mem/shared_mb", "mem/object_store_mb")  # process_memory_mb's keys


def process_memory_mb() -> dict[str, float]:
    """This process's memory in MiB (Linux; {} elsewhere): resident, private to it, shared with other
    processes, and the part of it that maps Ray's object store (/dev/shm/plasma*).

    A trial's data set arrives zero-copy from the object store, so it shows up in mem/object_store_mb
    (shared), not in mem/private_mb: N concurrent trials on a node hold it once.
    """
    kb = {"Rss": 0, "Private": 0, "Shared": 0, "plasma": 0}
    in_plasma = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head, _, rest = line.partition(" ")
                if not head.endswith(":"):  # a mapping's header line: address range, perms, ..., path
                    in_plasma = "plasma" in rest
                    continue
                if not rest.strip().endswith("kB"):
                    continue
                n = int(rest.split()[0])
                if head == "Rss:":
                    kb["Rss"] += n
                    kb["plasma"] += n if in_plasma else 0
                elif head in ("Private_Clean:", "Private_Dirty:"):
                    kb["Private"] += n
                elif head in ("Shared_Clean:", "Shared_Dirty:"):
                    kb["Shared"] += n
    except OSError:
        return {}
    return {name: kb[part] / 1024 for name, part in zip(MEMORY_METRICS, ("Rss", "Private", "Shared", "plasma"), strict=True)}
