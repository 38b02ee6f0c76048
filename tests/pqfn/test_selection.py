from __future__ import annotations

from typing import Any

from pqfn.selection import pareto_front, search_objective, select


def _row(tid: str, status: str, val: float, gap: float) -> dict[str, Any]:
    return {"trial_id": tid, "status": status, "val/acc": val, "gap/acc": gap, "params": {"trial.resolution": 32}}


def test_smallest_gap_among_informative() -> None:
    rows = [
        _row("learns-nothing", "completed", 0.25, 0.0),  # gap 0 because nothing is learned
        _row("stopped-early", "stopped", 0.70, 0.01),  # ASHA-stopped: small gap only because early
        _row("failed", "failed", float("nan"), float("nan")),
        _row("best-acc", "completed", 0.80, 0.15),
        _row("winner", "completed", 0.76, 0.05),
        _row("too-weak", "completed", 0.60, 0.02),  # outside the tolerance from the best
    ]
    sel = select(rows, "gap/acc", tolerance=0.05, floor=0.4)
    assert sel["selected"]["trial_id"] == "winner"
    assert sel["counts"] == {"completed": 4, "stopped": 1, "failed": 1}
    assert "smallest gap/acc" in sel["rule"]["text"]
    front = [p["trial_id"] for p in sel["pareto_front"]]
    assert "stopped-early" not in front and "learns-nothing" in front and "best-acc" in front


def test_no_informative_trial_selects_nothing() -> None:
    sel = select([_row("a", "completed", 0.26, 0.0), _row("b", "stopped", 0.9, 0.0)], "gap/acc", 0.05, 0.4)
    assert sel["selected"] is None and "below the floor" in sel["reason"]
    assert select([], "gap/acc", 0.05, 0.4)["selected"] is None


def test_pareto_front_is_non_dominated() -> None:
    rows = [_row("a", "completed", 0.5, 0.1), _row("b", "completed", 0.6, 0.2), _row("c", "completed", 0.55, 0.25)]
    assert [r["trial_id"] for r in pareto_front(rows, "gap/acc")] == ["a", "b"]


def test_search_objective_penalises_learning_nothing() -> None:
    assert search_objective({"val/acc": 0.25, "gap/acc": 0.0}, "gap/acc", 0.4) > search_objective(
        {"val/acc": 0.7, "gap/acc": 0.1}, "gap/acc", 0.4)
    assert search_objective({"val/acc": 0.7, "gap/acc": 0.1}, "gap/acc", 0.4) == 0.1
