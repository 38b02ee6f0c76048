"""The one metric vocabulary, used identically by the local trial, Tune, W&B and the files on disk.

Per fold k (1-based): `fold{k}/train/acc`, ...; across folds: the mean under the bare name
(`train/acc`) and the standard deviation with `_std` (`train/acc_std`).

gap/acc  = train/acc - val/acc    (positive = overfitting)
gap/loss = val/loss - train/loss  (positive = overfitting; the reference study writes
                                   Training - Validation for both, so its loss gap has the opposite sign)
"""

from __future__ import annotations

import numpy as np

FOLD_METRICS = ("train/acc", "train/loss", "val/acc", "val/loss", "val/bal_acc", "gap/acc", "gap/loss")


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
    return rec


def process_memory_mb() -> dict[str, float]:
    """This process's memory in MiB (Linux; {} elsewhere): resident, private to it, and shared with others.

    A trial's data set arrives zero-copy from Ray's object store, so it shows up as shared, not private:
    N concurrent trials on a node hold it once.
    """
    try:
        text = open("/proc/self/smaps_rollup").read()  # noqa: SIM115 - tiny read-only file
    except OSError:
        return {}
    kb: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            kb[parts[0].rstrip(":")] = int(parts[1])
    mb = 1024.0
    return {
        "mem/rss_mb": kb.get("Rss", 0) / mb,
        "mem/private_mb": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / mb,
        "mem/shared_mb": (kb.get("Shared_Clean", 0) + kb.get("Shared_Dirty", 0)) / mb,
    }
