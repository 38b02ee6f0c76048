"""Selection of the least-overfitting configuration that is still informative (no Ray needed).

A configuration that learns nothing has a gap of zero; it must never win. Rule: among trials
that COMPLETED their full epoch budget (never one stopped early by ASHA, whose early-epoch gap is
small only because nothing has overfit yet), keep those whose mean val/acc is at least `floor`
and within `tolerance` of the best completed trial's; pick the smallest gap (ties: higher val/acc).
"""

from __future__ import annotations

from typing import Any

COMPLETED, STOPPED, FAILED = "completed", "stopped", "failed"


def search_objective(rec: dict[str, float], gap_metric: str, floor: float | None) -> float:
    """What the single-objective searcher minimises: the gap, plus a penalty below the floor.

    objective = gap + 2 * max(0, floor - val/acc)
    so the searcher is not drawn to configurations that learn nothing (gap ~ 0).
    """
    penalty = max(0.0, (floor or 0.0) - rec["val/acc"])
    return rec[gap_metric] + 2.0 * penalty


def pareto_front(rows: list[dict[str, Any]], gap_metric: str) -> list[dict[str, Any]]:
    """Completed trials not dominated in (higher val/acc, lower gap)."""
    done = [r for r in rows if r["status"] == COMPLETED]
    front = []
    for r in done:
        dominated = any(
            o["val/acc"] >= r["val/acc"] and o[gap_metric] <= r[gap_metric]
            and (o["val/acc"] > r["val/acc"] or o[gap_metric] < r[gap_metric])
            for o in done
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["val/acc"])


def select(rows: list[dict[str, Any]], gap_metric: str, tolerance: float | None, floor: float | None) -> dict[str, Any]:
    """rows: one per trial with 'trial_id', 'status', 'val/acc', the gap metric and 'params'."""
    done = [r for r in rows if r["status"] == COMPLETED]
    counts = {s: sum(r["status"] == s for r in rows) for s in (COMPLETED, STOPPED, FAILED)}
    rule = {
        "gap_metric": gap_metric, "tolerance": tolerance, "floor": floor,
        "text": (
            f"smallest {gap_metric} among completed trials with val/acc"
            + (f" >= {floor}" if floor is not None else "")
            + (" and" if floor is not None and tolerance is not None else "")
            + (f" within {tolerance} of the best" if tolerance is not None else "")
        ),
    }
    out: dict[str, Any] = {"rule": rule, "counts": counts, "selected": None,
                           "pareto_front": [_brief(r, gap_metric) for r in pareto_front(rows, gap_metric)]}
    if not done:
        out["reason"] = "no trial completed its full epoch budget"
        return out
    best = max(r["val/acc"] for r in done)
    out["best_val_acc"] = best
    ok = [
        r for r in done
        if (floor is None or r["val/acc"] >= floor) and (tolerance is None or r["val/acc"] >= best - tolerance)
    ]
    out["n_informative"] = len(ok)
    if not ok:
        out["reason"] = (f"no completed trial is informative: the best val/acc is {best:.3f}"
                         + (f", below the floor {floor}" if floor is not None and best < floor else ""))
        return out
    chosen = min(ok, key=lambda r: (r[gap_metric], -r["val/acc"]))
    out["selected"] = _brief(chosen, gap_metric) | {"metrics": chosen.get("metrics", {})}
    out["reason"] = (f"{len(ok)} of {len(done)} completed trials are informative; trial {chosen['trial_id']} has the "
                     f"smallest {gap_metric} ({chosen[gap_metric]:+.4f}) with val/acc {chosen['val/acc']:.3f}")
    return out


def _brief(r: dict[str, Any], gap_metric: str) -> dict[str, Any]:
    return {"trial_id": r["trial_id"], "params": r["params"], "val/acc": r["val/acc"], gap_metric: r[gap_metric]}
