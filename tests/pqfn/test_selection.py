"""The selection rule on hand-made tables of trials (no training): class-aware, noise-aware, as documented."""

from __future__ import annotations

import math

from pqfn.config import SelectionConfig
from pqfn.records import TrialOutcome
from pqfn.selection import pareto_front, search_objective, select

SEL = SelectionConfig(metric="val/bal_acc", gap_metric="gap/acc", floor=0.4, min_class_recall=0.2, se_multiplier=1.0)


def _row(tid: str, bal: float, gap: float, *, status: str = "completed", min_recall: float = 0.5,
         bal_std: float = 0.03, gap_std: float = 0.03, folds: int = 3) -> TrialOutcome:
    m = {"val/bal_acc": bal, "val/bal_acc_std": bal_std, "val/acc": bal, "gap/acc": gap, "gap/acc_std": gap_std,
         "val/min_recall": min_recall, "n_folds": float(folds)}
    return TrialOutcome(trial_id=tid, status=status, params={"trial.resolution": int(tid[-1]) if tid[-1].isdigit() else 0},  # type: ignore[arg-type]
                        metrics=m)


def test_a_configuration_blind_to_one_class_is_never_selected() -> None:
    # 'blind' merges B into D: decent balanced accuracy, the smallest gap of all, but class B is never found.
    rows = [_row("blind", 0.62, 0.00, min_recall=0.02), _row("sees-all", 0.64, 0.12), _row("also", 0.63, 0.15)]
    sel = select(rows, SEL)
    assert sel.selected is not None and sel.selected["trial_id"] == "sees-all"
    verdicts = {c["trial_id"]: c["verdict"] for c in sel.candidates}
    assert "blind to a class" in verdicts["blind"]
    assert min(r.get("gap/acc") for r in rows) == 0.0  # it did have the smallest gap


def test_noise_aware_rule_on_a_hand_made_table() -> None:
    # No per-fold values: unpaired. Corrected SE = 0.03 * sqrt(1/3 + 1/2) = 0.0274; of a difference 0.0387.
    rows = [
        _row("best", 0.70, 0.20),              # best bal_acc; the reference
        _row("small-gap", 0.69, 0.05),         # 0.01 + 0.0387 <= 0.05: shown close enough; smallest gap -> wins
        _row("tied-gap", 0.695, 0.07),         # a contender; gap +0.02 within the noise of the winner's: tied
        _row("weak", 0.60, 0.01),              # informative, but 0.10 below the best
        _row("learns-nothing", 0.25, 0.0),     # below the floor
        _row("stopped", 0.75, 0.0, status="stopped"),  # ASHA-stopped: never considered
        _row("failed", math.nan, math.nan, status="failed"),
    ]
    sel = select(rows, SEL)
    assert sel.selected is not None and sel.selected["trial_id"] == "small-gap"
    assert sel.counts == {"completed": 5, "stopped": 1, "failed": 1}
    v = {c["trial_id"]: c["verdict"] for c in sel.candidates}
    assert v["small-gap"] == "selected"
    assert v["tied-gap"].startswith("contender") and v["best"].startswith("contender")
    assert "below the best" in v["weak"] and "not shown within" in v["weak"] and "floor" in v["learns-nothing"]
    assert [t["trial_id"] for t in sel.tied] == ["tied-gap"]  # bal and gap both within noise of the winner
    assert sel.best is not None and sel.best["trial_id"] == "best"
    # tolerance 0: no metric is given up for a smaller gap, so the best metric wins.
    strict = select(rows, SEL.model_copy(update={"tolerance": 0.0}))
    assert strict.selected is not None and strict.selected["trial_id"] == "best"


def test_more_folds_shrink_the_noise() -> None:
    # The same means: with 3 noisy folds b cannot be shown within 0.05 of a; with many folds it can.
    noisy = [_row("a", 0.70, 0.20, bal_std=0.08), _row("b", 0.68, 0.05, bal_std=0.08)]
    assert select(noisy, SEL).selected["trial_id"] == "a"  # type: ignore[index]
    precise = [_row("a", 0.70, 0.20, bal_std=0.08, folds=100), _row("b", 0.68, 0.05, bal_std=0.08, folds=100)]
    assert select(precise, SEL).selected["trial_id"] == "b"  # type: ignore[index]


def test_no_informative_trial_selects_nothing() -> None:
    sel = select([_row("a", 0.26, 0.0), _row("b", 0.9, 0.0, status="stopped")], SEL)
    assert sel.selected is None and "no completed trial is informative" in sel.reason
    assert select([], SEL).selected is None


def test_pareto_front_is_non_dominated() -> None:
    rows = [_row("a", 0.5, 0.1), _row("b", 0.6, 0.2), _row("c", 0.55, 0.25)]
    assert [r.trial_id for r in pareto_front(rows, "val/bal_acc", "gap/acc")] == ["a", "b"]


def test_search_objective_penalises_learning_nothing_and_missing_a_class() -> None:
    good = {"val/bal_acc": 0.7, "gap/acc": 0.1, "val/min_recall": 0.5}
    assert search_objective({"val/bal_acc": 0.25, "gap/acc": 0.0, "val/min_recall": 0.0}, SEL) > search_objective(good, SEL)
    assert search_objective({"val/bal_acc": 0.7, "gap/acc": 0.0, "val/min_recall": 0.0}, SEL) > search_objective(good, SEL)
    assert search_objective(good, SEL) == -0.7  # minimised: the metric, with no prize for a small gap
    capped = SEL.model_copy(update={"max_gap": 0.05})
    assert search_objective(good, capped) == -0.7 + 2 * (0.1 - 0.05)  # the gap only as a constraint
