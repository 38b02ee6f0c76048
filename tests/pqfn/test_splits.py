from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pqfn.data import Dataset
from pqfn.errors import DataError
from pqfn.splits import build_pool, cycle_cutoff, describe_pool, make_folds, split_test, write_folds_csv


def test_test_packages_are_whole_and_stratified(tiny_ds: Dataset) -> None:
    ho = split_test(tiny_ds, 0.2, seed=0)
    assert not set(tiny_ds.package_ids[ho.pool]) & set(tiny_ds.package_ids[ho.test])
    assert len(ho.pool) + len(ho.test) == len(tiny_ds)
    assert 0.1 < len(ho.test) / len(tiny_ds) < 0.35
    assert split_test(tiny_ds, 0.2, seed=0).test.tolist() == ho.test.tolist()  # deterministic


def test_pool_is_balanced_and_every_class_spans_the_same_cycles(tiny_ds: Dataset) -> None:
    ho = split_test(tiny_ds, 0.2, seed=0)
    entries = build_pool(tiny_ds, ho.pool, data_size=40, max_copies=10, seed=0)
    assert np.bincount(tiny_ds.labels[entries], minlength=4).tolist() == [10, 10, 10, 10]
    assert set(entries) <= set(ho.pool)
    cutoff = cycle_cutoff(tiny_ds, ho.pool, 10)
    assert cutoff is not None and tiny_ds.cycles[entries].max() <= cutoff
    # Earliest-first took every pristine (D) scan from cycle 0: "looks like cycle 0" was a shortcut for D.
    d_cycles = tiny_ds.cycles[entries[tiny_ds.labels[entries] == 3]]
    assert len(set(d_cycles.tolist())) > 1 and d_cycles.max() > 0
    desc = describe_pool(tiny_ds, entries)
    assert desc["D"]["cycles_max"] > 0 and sum(d["entries"] for d in desc.values()) == 40


def _cycles_dataset(labels: list[int], cycles: list[int]) -> Dataset:
    n = len(labels)
    names = np.array([f"s{i}" for i in range(n)])
    return Dataset(np.zeros((n, 4, 4), np.uint8), np.array(labels, np.int64), names, np.full(n, "Ag"),
                   np.array(cycles, np.int64), names, np.zeros(n, bool), names)


def test_cycle_cutoff_is_the_first_step_with_enough_of_every_class() -> None:
    # Two scans per class are needed. D: at 0 and 100; A: 100, 200; B: 200, 300; C: 100 only (all it has).
    ds = _cycles_dataset([3, 3, 3, 0, 0, 1, 1, 2], [0, 100, 200, 100, 200, 200, 300, 100])
    assert cycle_cutoff(ds, np.arange(len(ds)), per_class=2) == 300  # B reaches two scans at 300
    assert cycle_cutoff(ds, np.arange(len(ds)), per_class=1) == 200  # B's first scan is at 200
    unknown = _cycles_dataset([0, 1, 2, 3], [-1, -1, -1, -1])
    assert cycle_cutoff(unknown, np.arange(4), per_class=1) is None


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
