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
