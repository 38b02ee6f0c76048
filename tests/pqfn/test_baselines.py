"""Cheap baselines beside the CNN, package-bootstrap intervals and the beats / tied / loses verdict."""

from __future__ import annotations

import numpy as np
import pytest

from pqfn import baselines as bl
from pqfn import bootstrap
from pqfn.config import CLASSES, EvaluateConfig, TrialConfig
from pqfn.data import Dataset
from pqfn.ensemble import load_members
from pqfn.evaluate import cheap_verdict, compare_with_baselines, evaluate_holdout
from pqfn.splits import make_folds, split_test
from pqfn.trial import CrossValidation


def test_intensity_features_shape_and_regions() -> None:
    img = np.full((2, 40, 40), 60, np.uint8)
    img[1, 18:22, 18:22] = 250  # a bright patch in the centre of the second scan only
    f = bl.intensity_features(img)
    n = bl.FEATURES_PER_REGION
    assert f.shape == (2, 3 * n) and np.isfinite(f).all()
    centre, ring = f[:, n : 2 * n], f[:, 2 * n :]
    assert centre[1, 11] > centre[0, 11]  # centre max: the patch
    np.testing.assert_array_equal(ring[0], ring[1])  # the ring does not see it


def _spy_on_fits(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """The rows of every Baseline.fit from now on, in call order."""
    seen: list[np.ndarray] = []
    fit = bl.Baseline.fit

    def spy(self: bl.Baseline, rows: np.ndarray, labels: np.ndarray):  # type: ignore[no-untyped-def]
        seen.append(np.array(rows))
        return fit(self, rows, labels)

    monkeypatch.setattr(bl.Baseline, "fit", spy)
    return seen


def test_baseline_in_cv_sees_exactly_the_trials_training_images(tiny_ds: Dataset,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy_on_fits(monkeypatch)
    cfg = TrialConfig(model="test_resnet", resolution=32, folds=2, epochs=1, data_size=40, batch_size=8, max_copies=10, device="cpu")
    ho = split_test(tiny_ds, 0.2, seed=0)
    cv = CrossValidation(cfg, tiny_ds, ho.pool)
    n_baselines = len(bl.make_baselines(tiny_ds))
    assert len(seen) == n_baselines * cfg.folds
    for k, rows in enumerate(seen):
        fold = cv.folds[k % cfg.folds]
        np.testing.assert_array_equal(rows, fold.train)  # the CNN's training entries, copies included
        assert not set(rows) & set(fold.val) and not set(rows) & set(ho.test)
    rec = cv.run_epoch()
    assert rec is not None
    for name in ("intensity", "metadata"):
        for k in (1, 2):
            assert 0 <= rec[f"fold{k}/baseline/{name}/val/bal_acc"] <= 1
        assert rec[f"baseline/{name}/val/bal_acc"] == pytest.approx(
            np.mean([rec[f"fold{k}/baseline/{name}/val/bal_acc"] for k in (1, 2)]))
    best = max(("intensity", "metadata"), key=lambda n: rec[f"baseline/{n}/val/bal_acc"])
    assert rec["vs_baseline/val/bal_acc"] == pytest.approx(rec["val/bal_acc"] - rec[f"baseline/{best}/val/bal_acc"])


def test_intensity_size_is_chosen_on_the_training_folds_only(tiny_ds: Dataset,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Two candidate sizes (the tiny scans are 48 px): each is scored out of fold, fitted on training folds only.
    monkeypatch.setattr(bl, "ANALYSIS_SIZES", (16, 48))
    seen = _spy_on_fits(monkeypatch)
    ho = split_test(tiny_ds, 0.2, seed=0)
    folds = make_folds(tiny_ds, ho.pool, 2, seed=0)
    chosen = bl.make_baselines(tiny_ds, ho.pool, folds)[0]
    assert len(seen) == 2 * len(folds)  # each candidate, each fold
    for rows in seen:
        assert any(np.array_equal(rows, f.train) for f in folds)
        assert not set(rows) & set(ho.test)
    monkeypatch.undo()  # the real fit again, for the scores below
    monkeypatch.setattr(bl, "ANALYSIS_SIZES", (16, 48))
    scores = {s: bl._cv_score(bl.Baseline("intensity", bl._intensity_at(tiny_ds, ho.pool, s), s), tiny_ds.labels, folds)
              for s in (16, 48)}
    assert chosen.name == "intensity" and chosen.size == max(scores, key=lambda s: (scores[s], -s))
    # at 16 px the statistics differ from those at the decoded 48 px: the size is really applied
    assert not np.allclose(bl._intensity_at(tiny_ds, ho.pool, 16)[ho.pool], bl._intensity_at(tiny_ds, ho.pool, 48)[ho.pool])
    # without folds there is nothing to choose on: the largest candidate
    assert bl.make_baselines(tiny_ds, ho.pool)[0].size == 48


def _packages(n_pkg: int, per_pkg: int) -> np.ndarray:
    return np.repeat([f"P{i:02d}" for i in range(n_pkg)], per_pkg)


def test_bootstrap_resamples_packages_not_scans() -> None:
    # 20 packages of 10 scans; a package is right or wrong as a whole (its scans move together).
    groups = _packages(20, 10)
    y = np.zeros(200, np.int64)
    pred = np.where(np.repeat(np.arange(20) % 2 == 0, 10), 0, 1)
    iv = bootstrap.classification_intervals(y, pred, groups, 4)["acc"]
    assert iv.value == 0.5
    # Resampling 20 packages: sd = sqrt(.25 / 20) = 0.11, a 95 % interval about 0.44 wide; resampling the
    # 200 scans as if independent would give one about 0.14 wide.
    assert iv.hi - iv.lo > 0.3
    scans = bootstrap.classification_intervals(y, pred, np.arange(200).astype(str), 4)["acc"]
    assert scans.hi - scans.lo < 0.2
    codes, w = bootstrap.package_draws(groups, n_boot=50)
    assert w.shape == (50, 20) and (w.sum(1) == 20).all() and len(np.unique(codes)) == 20


def test_paired_interval_is_narrower_than_either_alone() -> None:
    # Two models that share which packages are hard: the paired difference cancels the shared part.
    rng = np.random.default_rng(0)
    groups = _packages(40, 5)
    y = rng.integers(0, 4, 200)
    hard = np.repeat(rng.random(40) < 0.4, 5)
    a = np.where(hard, (y + 1) % 4, y)
    b = a.copy()
    easy_pkgs = np.flatnonzero(~hard[::5])[:12]
    flip = easy_pkgs * 5  # one scan in each of 12 easy packages
    b[flip] = (y[flip] + 1) % 4  # b is worse on those 12 scans
    d = bootstrap.paired_difference(y, a, b, groups, 4)["acc"]
    alone = bootstrap.classification_intervals(y, a, groups, 4)["acc"]
    assert d.value == pytest.approx(12 / 200)
    assert d.hi - d.lo < alone.hi - alone.lo
    assert bootstrap.verdict(d) == "beats"


def _cheap(pred: np.ndarray) -> dict[str, dict[str, object]]:
    return {"intensity": {"pred": pred, "raw_pred": pred, "prior_strength": 0.0, "cv_balanced_accuracy": 0.5}}


@pytest.mark.parametrize("case", ["beats", "tied", "loses"])
def test_verdict_three_outcomes(case: str) -> None:
    rng = np.random.default_rng(1)
    groups = _packages(60, 4)
    y = rng.integers(0, 4, 240)
    good = y.copy()
    bad = np.where(rng.random(240) < 0.5, (y + 1) % 4, y)  # half wrong
    cnn, base = {"beats": (good, bad), "tied": (bad, bad.copy()), "loses": (bad, good)}[case]
    res = compare_with_baselines(y, cnn, groups, _cheap(base), majority=3)
    v = res["versus_baseline"]
    assert v["outcome"] == case and v["baseline"] == "intensity"
    text = cheap_verdict(v)
    assert text.startswith({"beats": "beats", "tied": "TIED", "loses": "LOSES"}[case])
    lo, hi = v["difference"]["balanced_accuracy"]["lo"], v["difference"]["balanced_accuracy"]["hi"]
    assert (lo > 0) if case == "beats" else (hi < 0) if case == "loses" else (lo <= 0 <= hi)
    assert set(res["intervals"]) >= {"accuracy", "balanced_accuracy", "macro_f1", *(f"recall_{c}" for c in CLASSES)}


def _brightness_dataset(n_pkg: int = 48, per_pkg: int = 3, size: int = 32) -> Dataset:
    """Scans whose class is decided by their mean brightness alone (and nothing else): the baseline's home ground."""
    rng = np.random.default_rng(0)
    labels = np.repeat(rng.integers(0, 4, n_pkg), per_pkg)
    level = np.array([50, 100, 150, 200])[labels]
    images = np.clip(level[:, None, None] + rng.normal(0, 25, (len(labels), size, size)), 0, 255).astype(np.uint8)
    pkgs = _packages(n_pkg, per_pkg)
    n = len(labels)
    return Dataset(images, labels.astype(np.int64), pkgs, np.full(n, ""), np.full(n, -1, np.int64),
                   np.array([f"s{i}.png" for i in range(n)]), np.zeros(n, bool), np.array([f"s{i}.png" for i in range(n)]))


@pytest.mark.slow
def test_a_perfect_cheap_baseline_is_not_beaten(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ds = _brightness_dataset()
    ho = split_test(ds, 0.25, seed=0)
    cfg = TrialConfig(resolution=16, folds=2, epochs=1, data_size=48, batch_size=8, max_copies=3, device="cpu")
    cv = CrossValidation(cfg, ds, ho.pool)
    cv.fit()
    cv.save_models(tmp_path / "m")
    m, _ = evaluate_holdout(cfg, EvaluateConfig(prior_strength=0), load_members(tmp_path / "m", cfg.model),
                            cv.out_of_fold(), ds, ho, tmp_path / "ev", decode_size=32, log=lambda s: None)
    assert m["cheap_baselines"]["intensity"]["balanced_accuracy"] == 1.0  # brightness alone decides
    assert "metadata" not in m["cheap_baselines"]  # no metallization or cycles in this data set
    assert m["versus_baseline"]["outcome"] in ("tied", "loses")
    assert not m["verdict"].startswith("beats")


def test_too_few_packages_give_no_interval_and_no_verdict() -> None:
    # Three packages cannot show the noise: a "perfect" paired difference on them is not evidence.
    groups = _packages(3, 10)
    y = np.tile([0, 1, 2, 3, 3], 6)
    d = bootstrap.paired_difference(y, y, (y + 1) % 4, groups, 4)["bal_acc"]
    assert d.value == 1.0 and np.isnan(d.lo) and np.isnan(d.hi)
    assert bootstrap.verdict(d) == "tied"


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_bootstrap_point_figures_match_scikit_learn() -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    rng = np.random.default_rng(3)
    for _ in range(5):
        y = rng.integers(0, 3, 60)  # class 3 absent from the truth ...
        pred = rng.integers(0, 4, 60)  # ... but predicted
        iv = bootstrap.classification_intervals(y, pred, _packages(12, 5), 4, n_boot=20)
        assert iv["acc"].value == pytest.approx(accuracy_score(y, pred))
        assert iv["bal_acc"].value == pytest.approx(balanced_accuracy_score(y, pred))
        assert iv["f1"].value == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_findings_say_which_delamination_a_model_misses() -> None:
    from pqfn.evaluate import finding_rates

    # 8 packages x 4 scans, one of each class; the model sees die-pad delamination perfectly and never bond-pad:
    # it answers A for C and D for B. The baseline is perfect.
    y = np.tile(np.arange(4), 8)  # A B C D ...
    groups = np.repeat([f"P{i}" for i in range(8)], 4)
    pred = np.array([{0: 0, 1: 3, 2: 0, 3: 3}[v] for v in y])
    f = finding_rates(y, pred, y.copy(), groups)
    assert f["die_pad"]["cnn"]["accuracy"]["value"] == 1.0 and f["die_pad"]["cnn"]["sensitivity"]["value"] == 1.0
    bond = f["bond_pad"]
    assert bond["cnn"]["accuracy"]["value"] == 0.5 and bond["cnn"]["sensitivity"]["value"] == 0.0
    assert bond["cnn"]["specificity"]["value"] == 1.0 and bond["n_with"] == 16
    assert bond["baseline"]["accuracy"]["value"] == 1.0
    assert bond["cnn_minus_baseline_accuracy"]["value"] == -0.5 and bond["cnn_minus_baseline_accuracy"]["outcome"] == "loses"
    assert f["die_pad"]["cnn_minus_baseline_accuracy"]["outcome"] == "tied"  # equal on every resample: interval [0, 0]
