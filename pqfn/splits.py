"""Leakage-free splits: held-out test packages, the balanced data_size pool, grouped k folds.

Everything is grouped by physical package: every scan of a package, and every augmented copy
of a scan, lives in exactly one of {test, fold 1, ..., fold k}.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pqfn.config import CLASSES
from pqfn.data import Dataset
from pqfn.errors import DataError


@dataclass(frozen=True)
class HoldOut:
    pool: np.ndarray  # indices of images the search may use
    test: np.ndarray  # indices of held-out test images (whole packages)


@dataclass(frozen=True)
class Fold:
    train: np.ndarray  # pool entries for training: indices into the Dataset, repeated for augmented copies
    train_eval: np.ndarray  # unique training images (for train/acc without augmentation)
    val: np.ndarray  # unique validation images, never augmented


def split_test(ds: Dataset, test_fraction: float, seed: int) -> HoldOut:
    """Set whole packages aside for the final test, stratified by class, before any search."""
    if ds.is_test.any():
        test = np.flatnonzero(ds.is_test)
        pool = np.flatnonzero(~ds.is_test)
        both = set(ds.package_ids[test]) & set(ds.package_ids[pool])
        if both:
            shown = ", ".join(str(p) for p in sorted(both)[:5])  # plain ids, not np.str_('P00')
            raise DataError(f"data.test_manifest: {len(both)} package(s) also appear in the training data: {shown}")
        return HoldOut(pool, test)
    n_splits = max(2, round(1 / test_fraction))
    n_pkg = len(np.unique(ds.package_ids))
    if n_pkg < n_splits:
        raise DataError(
            f"{n_pkg} package(s) are too few to hold out {test_fraction:.0%} of them (data.test_fraction); "
            f"at least {n_splits} are needed"
        )
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    pool, test = next(sgkf.split(np.zeros(len(ds)), ds.labels, ds.package_ids))
    return HoldOut(np.sort(pool), np.sort(test))


def cycle_cutoff(ds: Dataset, candidates: np.ndarray, per_class: int) -> int | None:
    """The study's data size: every scan up to a thermal-cycling step. The smallest step at which every class
    has as many originals as it needs (per_class), or all it will ever have; None when any candidate's cycles
    are unknown (then no cutoff: the pool is drawn from every scan)."""
    cyc = ds.cycles[candidates]
    if (cyc < 0).any() or len(cyc) == 0:
        return None
    labels = ds.labels[candidates]
    for t in np.unique(cyc):
        if all(((labels == c) & (cyc <= t)).sum() >= min(per_class, (labels == c).sum()) for c in range(len(CLASSES))):
            return int(t)
    return int(cyc.max())


def build_pool(ds: Dataset, candidates: np.ndarray, data_size: int, max_copies: int, seed: int) -> np.ndarray:
    """The balanced cross-validation pool: data_size / 4 entries per class.

    As in the study, the pool holds the scans up to a thermal-cycling step (cycle_cutoff: the first step at
    which every class has enough originals, or all it has), then balanced: each class's originals are drawn at
    random from ALL its scans up to that step, so every class is drawn from the same window of cycles, 0 to the
    cutoff (earliest-first made every pristine scan a cycle-0 scan, and "looks like cycle 0" a shortcut for D;
    pristine scans are still more common at early cycles, as in the data). Without cycles, at random.
    A class with fewer originals is filled with augmented copies, spread evenly over its originals, at most
    `max_copies` per original. Returns indices into ds; a repeated index is an augmented copy (augmented
    afresh whenever it is drawn).
    """
    per_class = data_size // len(CLASSES)
    rng = np.random.default_rng(seed)
    cutoff = cycle_cutoff(ds, candidates, per_class)
    if cutoff is not None:
        candidates = candidates[ds.cycles[candidates] <= cutoff]
    entries = []
    for c, name in enumerate(CLASSES):
        idx = candidates[ds.labels[candidates] == c]
        if len(idx) == 0:
            raise DataError(f"class {name} has no images in the search pool; every class needs some")
        idx = idx[rng.permutation(len(idx))]
        if len(idx) >= per_class:
            entries.append(np.sort(idx[:per_class]))
            continue
        most = len(idx) * (1 + max_copies)
        if per_class > most:
            raise DataError(
                f"trial.data_size={data_size} needs {per_class} images of class {name}, but the search pool has "
                f"{len(idx)}: at most {most} with trial.max_copies={max_copies} augmented copies each; "
                f"lower data_size or raise max_copies"
            )
        reps = np.full(len(idx), per_class // len(idx))
        reps[: per_class % len(idx)] += 1
        entries.append(np.repeat(idx, reps))
    return np.concatenate(entries)


def describe_pool(ds: Dataset, entries: np.ndarray) -> dict[str, dict[str, float]]:
    """Per class: originals, entries (with copies), and the thermal cycles its originals came from."""
    out = {}
    for c, name in enumerate(CLASSES):
        e = entries[ds.labels[entries] == c]
        orig = np.unique(e)
        cyc = ds.cycles[orig]
        known = cyc[cyc >= 0]
        out[name] = {"originals": int(len(orig)), "entries": int(len(e))} | (
            {"cycles_min": int(known.min()), "cycles_max": int(known.max()), "cycles_mean": round(float(known.mean()), 1)}
            if len(known) else {})
    return out


def make_folds(ds: Dataset, entries: np.ndarray, k: int, seed: int) -> list[Fold]:
    """Stratified group k-fold over the pool entries, grouped by package (copies follow their original)."""
    groups = ds.package_ids[entries]
    n_pkg = len(np.unique(groups))
    if n_pkg < k:
        raise DataError(f"the search pool has {n_pkg} package(s), fewer than trial.folds={k}; lower folds or add data")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for tr, va in sgkf.split(np.zeros(len(entries)), ds.labels[entries], groups):
        folds.append(Fold(train=entries[tr], train_eval=np.unique(entries[tr]), val=np.unique(entries[va])))
    return folds


def repeated_folds(ds: Dataset, entries: np.ndarray, k: int, repeats: int, seed: int) -> list[Fold]:
    """trial.repeats x trial.folds folds: repeat r (0-based) draws its k grouped folds with seed + r, so repeat 0
    is make_folds(..., seed) and a trial without repeats keeps its folds. Fold j of the list (1-based) is fold
    ((j - 1) % k) + 1 of repeat (j - 1) // k + 1."""
    return [f for r in range(repeats) for f in make_folds(ds, entries, k, seed + r)]


def write_folds_csv(path: Path, ds: Dataset, holdout: HoldOut, entries: np.ndarray, folds: list[Fold],
                    k: int = 0) -> None:
    """One row per image: its package, label and where it went (fold number, test or unused). With repeated
    cross-validation (k folds per repeat, `repeats` > 1), `fold` is the first repeat's and `fold_r2`, ... the others'."""
    repeats = max(1, len(folds) // k) if k else 1
    where = [np.full(len(ds), "unused", dtype=object) for _ in range(repeats)]
    for r in range(repeats):
        where[r][holdout.test] = "test"
        for i, f in enumerate(folds[r * k : (r + 1) * k] if k else folds, start=1):
            where[r][f.val] = str(i)
    copies = np.bincount(entries, minlength=len(ds))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "package_id", "label", "metallization", "cycles", "fold",
                    *(f"fold_r{r}" for r in range(2, repeats + 1)), "pool_entries"])
        for i in range(len(ds)):
            w.writerow([ds.paths[i], ds.package_ids[i], CLASSES[ds.labels[i]], ds.metallization[i],
                        ds.cycles[i], where[0][i], *(where[r][i] for r in range(1, repeats)), copies[i]])
    tmp.replace(path)
