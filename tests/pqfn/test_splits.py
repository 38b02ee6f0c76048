from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pqfn.data import Dataset
from pqfn.errors import DataError
from pqfn.splits import build_pool, make_folds, split_test, write_folds_csv


def test_test_packages_are_whole_and_stratified(tiny_ds: Dataset) -> None:
    ho = split_test(tiny_ds, 0.2, seed=0)
    assert not set(tiny_ds.package_ids[ho.pool]) & set(tiny_ds.package_ids[ho.test])
    assert len(ho.pool) + len(ho.test) == len(tiny_ds)
    assert 0.1 < len(ho.test) / len(tiny_ds) < 0.35
    assert split_test(tiny_ds, 0.2, seed=0).test.tolist() == ho.test.tolist()  # deterministic


def test_pool_is_balanced_earliest_cycles_first(tiny_ds: Dataset) -> None:
    ho = split_test(tiny_ds, 0.2, seed=0)
    entries = build_pool(tiny_ds, ho.pool, data_size=40, max_copies=10, seed=0)
    assert np.bincount(tiny_ds.labels[entries], minlength=4).tolist() == [10, 10, 10, 10]
    assert set(entries) <= set(ho.pool)
    d_pool = ho.pool[tiny_ds.labels[ho.pool] == 3]
    chosen = set(entries[tiny_ds.labels[entries] == 3])
    unchosen = [i for i in d_pool if i not in chosen]
    assert max(tiny_ds.cycles[list(chosen)]) <= min(tiny_ds.cycles[unchosen])


def test_folds_group_packages_and_copies(tiny_ds: Dataset) -> None:
    ho = split_test(tiny_ds, 0.2, seed=0)
    entries = build_pool(tiny_ds, ho.pool, data_size=40, max_copies=10, seed=0)
    folds = make_folds(tiny_ds, entries, k=3, seed=0)
    seen: dict[str, int] = {}
    for k, f in enumerate(folds):
        val_pkgs = set(tiny_ds.package_ids[f.val])
        train_pkgs = set(tiny_ds.package_ids[f.train])
        assert not val_pkgs & train_pkgs
        assert set(tiny_ds.package_ids[f.train_eval]) == train_pkgs
        assert len(np.unique(f.val)) == len(f.val)  # validation: originals only, once each
        for p in val_pkgs:
            assert p not in seen, f"package {p} in folds {seen[p]} and {k}"
            seen[p] = k
    # Every augmented copy sits in its original's fold: the folds partition the pool's entries.
    assert sum(len(f.val) for f in folds) == len(np.unique(entries))


def test_honest_errors(tiny_ds: Dataset) -> None:
    ho = split_test(tiny_ds, 0.2, seed=0)
    with pytest.raises(DataError, match=r"data_size=400 needs 100 images of class .*max_copies=1"):
        build_pool(tiny_ds, ho.pool, data_size=400, max_copies=1, seed=0)
    only_d = ho.pool[tiny_ds.labels[ho.pool] == 3]
    with pytest.raises(DataError, match="class A has no images"):
        build_pool(tiny_ds, only_d, data_size=8, max_copies=1, seed=0)
    entries = build_pool(tiny_ds, ho.pool, data_size=40, max_copies=10, seed=0)
    with pytest.raises(DataError, match="fewer than trial.folds=19"):
        make_folds(tiny_ds, entries, k=19, seed=0)
    few = tiny_ds.subset(np.flatnonzero(np.isin(tiny_ds.package_ids, ["Ag-001", "Cu-001"])))
    with pytest.raises(DataError, match="too few to hold out"):
        split_test(few, 0.2, seed=0)


def test_folds_csv_lists_every_image(tiny_ds: Dataset, tmp_path: Path) -> None:
    ho = split_test(tiny_ds, 0.2, seed=0)
    entries = build_pool(tiny_ds, ho.pool, data_size=40, max_copies=10, seed=0)
    folds = make_folds(tiny_ds, entries, k=3, seed=0)
    write_folds_csv(tmp_path / "folds.csv", tiny_ds, ho, entries, folds)
    rows = list(csv.DictReader((tmp_path / "folds.csv").open()))
    assert len(rows) == len(tiny_ds)
    assert {r["fold"] for r in rows} == {"1", "2", "3", "test", "unused"}
    per_pkg: dict[str, set[str]] = {}
    for r in rows:
        if r["fold"] != "unused":
            per_pkg.setdefault(r["package_id"], set()).add(r["fold"])
    assert all(len(v) == 1 for v in per_pkg.values())
