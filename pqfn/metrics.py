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
TRIAL_METRICS = ("train/acc", "val/acc", "gap/acc", "train/loss", "val/loss", "gap/loss", "val/bal_acc", "val/f1",
                 "val/min_recall", *PER_CLASS_METRICS, "val/acc_std", "val/bal_acc_std", "val/f1_std",
                 "gap/acc_std", "gap/loss_std", "n_folds", "objective")

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
