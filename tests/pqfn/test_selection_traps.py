"""Trap tests (issue 20) written BEFORE the rule change, to be run against the old rule."""

from __future__ import annotations

import numpy as np
import pytest

from pqfn.config import SelectionConfig
from pqfn.records import TrialOutcome
from pqfn.selection import search_objective, select

SEL = SelectionConfig(metric="val/bal_acc", gap_metric="gap/acc", floor=0.4, min_class_recall=0.2, se_multiplier=1.0)
BASE = np.array([0.62, 0.70, 0.78])  # a hard, a middling and an easy fold, shared by trials with the same folds


def _trial(tid: str, bal: list[float] | np.ndarray, gap: list[float] | np.ndarray, *, data_size: int = 200,
           min_recall: float | None = 0.5, drop: tuple[str, ...] = ()) -> TrialOutcome:
    bal, gap = np.asarray(bal, float), np.asarray(gap, float)
    m: dict[str, float] = {"n_folds": float(len(bal))}
    for name, v in (("val/bal_acc", bal), ("gap/acc", gap), ("val/acc", bal)):
        m[name], m[f"{name}_std"] = float(v.mean()), float(v.std(ddof=1))
        for k, x in enumerate(v, start=1):
            m[f"fold{k}/{name}"] = float(x)
    if min_recall is not None:
        m["val/min_recall"] = min_recall
    for key in drop:
        m.pop(key, None)
    return TrialOutcome(trial_id=tid, status="completed", params={"trial.data_size": data_size, "trial.tag": tid},
                        metrics=m)


def _chosen(rows: list[TrialOutcome], sel: SelectionConfig = SEL) -> str:
    s = select(rows, sel)
    assert s.selected is not None, s.reason
    return str(s.selected["trial_id"])


def test_a_noisy_gap_does_not_open_the_door() -> None:
    for spread in (0.05, 0.40):
        steady = _trial("steady", BASE, [0.0, 0.05, 0.10])
        noisy = _trial("noisy", BASE + [0.005, 0.015, 0.01], [0.25 - spread, 0.25, 0.25 + spread])
        assert _chosen([steady, noisy]) == "steady", spread


def test_a_noisy_weaker_trial_does_not_beat_the_best() -> None:
    wide = np.array([0.61, 0.70, 0.79])  # fold spread 0.09 at 3 folds
    best = _trial("best", wide, [0.12, 0.15, 0.18])
    for data_size in (200, 160):  # shares the best's folds (paired), and does not (unpaired)
        weaker = _trial("weaker", wide - [0.06, 0.08, 0.07], [0.0, 0.0, 0.0], data_size=data_size)
        assert _chosen([best, weaker]) == "best", data_size


def test_paired_folds_show_what_unpaired_noise_hides() -> None:
    wide = np.array([0.61, 0.70, 0.79])
    best = _trial("best", wide, [0.17, 0.20, 0.23])
    close = wide - [0.015, 0.02, 0.025]
    assert _chosen([best, _trial("close", close, [0.03, 0.05, 0.07])]) == "close"  # paired: within 0.05, shown
    assert _chosen([best, _trial("close", close, [0.03, 0.05, 0.07], data_size=160)]) == "best"  # unpaired: not shown


def test_an_underfitting_configuration_is_not_selected() -> None:
    centre = _trial("batch8", [0.66, 0.72, 0.78], [0.15, 0.18, 0.21])
    big_batch = _trial("batch64", [0.64, 0.66, 0.74], [0.01, 0.03, 0.05])  # fits less: lower score, small gap
    tiny_lr = _trial("lr1e-5", [0.54, 0.60, 0.66], [0.0, 0.01, 0.02])
    assert _chosen([centre, big_batch, tiny_lr]) == "batch8"


def test_a_missing_input_makes_a_trial_not_informative() -> None:
    good = _trial("good", BASE, [0.08, 0.10, 0.12])
    no_recall = _trial("no-recall", BASE + 0.01, [0.0, 0.0, 0.0], min_recall=None)
    no_std = _trial("no-std", BASE + 0.01, [0.0, 0.01, 0.02], drop=("gap/acc_std",))
    no_folds = _trial("no-n", BASE + 0.01, [0.0, 0.01, 0.02], drop=("n_folds",))
    s = select([good, no_recall, no_std, no_folds], SEL)
    assert s.selected is not None and s.selected["trial_id"] == "good"
    v = {c["trial_id"]: c["verdict"] for c in s.candidates}
    assert v["no-recall"].startswith("not informative") and "val/min_recall" in v["no-recall"]
    assert v["no-std"].startswith("not informative") and "gap/acc_std" in v["no-std"]
    assert v["no-n"].startswith("not informative") and "n_folds" in v["no-n"]


def test_the_search_objective_does_not_reward_a_missing_class_recall() -> None:
    rec = {"val/bal_acc": 0.7, "gap/acc": 0.1}
    assert search_objective(rec, SEL) >= search_objective(rec | {"val/min_recall": 0.0}, SEL)


def _simulated(batch: int, lr: float) -> dict[str, float]:
    """A trial's final record on a made-up response: larger batches (fewer steps at a fixed epoch budget)
    and smaller learning rates fit less: lower train and validation scores, and a smaller gap."""
    under = np.log2(batch / 8) / 3 + max(0.0, np.log10(3e-4 / lr)) / 1.5  # 0 = fits fully, >= 1 = barely
    learn = float(np.clip(1 - under, 0, 1))
    return {"val/bal_acc": 0.45 + 0.3 * learn, "gap/acc": 0.02 + 0.2 * learn, "val/min_recall": 0.25 + 0.4 * learn}


def test_the_searcher_is_not_drawn_to_configurations_that_fit_less() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=6), direction="minimize")

    def objective(t: optuna.Trial) -> float:
        rec = _simulated(t.suggest_categorical("batch", [8, 16, 32, 64]), t.suggest_float("lr", 1e-5, 3e-3, log=True))
        return search_objective(rec, SEL)

    study.optimize(objective, n_trials=30)
    guided = study.trials[6:]  # after the random start-up trials
    underfit = sum(t.params["batch"] == 64 or t.params["lr"] < 3e-5 for t in guided)
    fits = sum(t.params["batch"] <= 16 and t.params["lr"] >= 3e-4 for t in guided)
    assert underfit < fits, (underfit, fits)
    assert study.best_params["batch"] <= 16 and study.best_params["lr"] >= 3e-4


def test_repeats_shrink_the_noise_term_but_not_the_overlap_term() -> None:
    from pqfn.records import overlap_factor

    assert overlap_factor(3) == pytest.approx(1 / 3 + 1 / 2)  # Nadeau-Bengio, 3 folds
    assert overlap_factor(6, 2) == pytest.approx(1 / 6 + 1 / 2)  # Bouckaert-Frank, 3 folds x 2 repeats
    assert overlap_factor(30, 10) > 0.5  # never below n_val / n_train, however many repeats
    one = TrialOutcome("a", "completed", {}, {"val/bal_acc_std": 0.1, "n_folds": 3})
    two = TrialOutcome("b", "completed", {}, {"val/bal_acc_std": 0.1, "n_folds": 6, "n_repeats": 2})
    six = TrialOutcome("c", "completed", {}, {"val/bal_acc_std": 0.1, "n_folds": 6})  # 6 folds, one repeat
    assert two.se("val/bal_acc") == pytest.approx(0.1 * np.sqrt(1 / 6 + 1 / 2))
    assert six.se("val/bal_acc") < two.se("val/bal_acc") < one.se("val/bal_acc")


def test_trials_with_other_repeats_are_not_paired() -> None:
    from pqfn.selection import shares_folds

    folds = {f"fold{k}/val/bal_acc": 0.5 + 0.01 * k for k in range(1, 7)}
    a = TrialOutcome("a", "completed", {"trial.repeats": 2}, folds | {"n_folds": 6, "n_repeats": 2})
    b = TrialOutcome("b", "completed", {"trial.repeats": 2}, folds | {"n_folds": 6, "n_repeats": 2})
    c = TrialOutcome("c", "completed", {"trial.folds": 6}, folds | {"n_folds": 6})
    assert shares_folds(a, b) and not shares_folds(a, c)


def test_a_two_objective_search_may_explore_underfitting_but_never_selects_it() -> None:
    """objective: multi (NSGA-II on metric and gap) puts configurations that fit less on its front by design:
    measured on this response, 5-8 of 24 guided proposals underfit against 3-5 that fit (seeds 0-2), which is
    why `single` is the default. The selection must still refuse them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.NSGAIISampler(seed=0, population_size=6),
                                directions=["maximize", "minimize"])
    outcomes = []

    def objective(t: optuna.Trial) -> tuple[float, float]:
        batch, lr = t.suggest_categorical("batch", [8, 16, 32, 64]), t.suggest_float("lr", 1e-5, 3e-3, log=True)
        rec = _simulated(batch, lr)
        stds = {f"{k}_std": 0.03 for k in ("val/bal_acc", "gap/acc")}
        outcomes.append(TrialOutcome(str(t.number), "completed", {"trial.batch_size": batch, "trial.optimizer.lr": lr},
                                     rec | stds | {"n_folds": 5}))
        return rec["val/bal_acc"], rec["gap/acc"]

    study.optimize(objective, n_trials=30)
    assert any(o.params["trial.batch_size"] == 64 or o.params["trial.optimizer.lr"] < 3e-5 for o in outcomes)
    sel = select(outcomes, SelectionConfig(**(SEL.model_dump() | {"tolerance": 0.05})))
    assert sel.selected is not None
    p = sel.selected["params"]
    assert p["trial.batch_size"] < 64 and p["trial.optimizer.lr"] >= 3e-5, p  # not one of the underfitting ones
    best = max(o.get("val/bal_acc") for o in outcomes)
    assert sel.selected["val/bal_acc"] >= best - 0.05


def test_a_gap_smaller_by_a_hair_of_its_noise_does_not_swap_the_best_away() -> None:
    """Measured (main job, seed 0): two trials sharing folds, upper gaps 0.057 and 0.063; the old winner rule (smallest
    upper gap) gave up the best metric for a gap that was no smaller within its noise, and lost 0.16 held-out."""
    best = _trial("best", [0.55, 0.56, 0.54], [-0.027, 0.020, 0.067])  # gap +0.020 +- 0.043 SE
    hair = _trial("hair", [0.548, 0.558, 0.538], [-0.052, 0.005, 0.062])  # gap +0.005 +- 0.052 SE, metric 0.002 lower
    assert _chosen([best, hair]) == "best"
    shown = _trial("shown", [0.548, 0.558, 0.538], [-0.01, 0.0, 0.01])  # gap +0.000 +- 0.009 SE: below the best's
    assert _chosen([best, shown]) == "shown"
