"""Selection of the least-overfitting configuration that is still informative (no Ray needed).

Two traps shape the rule (design.md, "Selection"). A configuration that learns less has a smaller
gap (one blind to bond-pad patches at low resolution merges B into D and "wins"), so a trial is
informative only if its balanced metric clears a floor AND every class is found (worst per-class
recall). And with 3-5 folds most differences between trials lie inside the fold noise, so every
comparison is made in standard errors (fold std / sqrt(folds)), and the trials tied with the
winner are named. The rule in steps (SelectionConfig documents the keys):

1. only COMPLETED trials (never one stopped early by ASHA: its early gap is small because nothing
   has overfit yet);
2. informative: metric >= floor and val/min_recall >= min_class_recall;
3. contenders: informative trials whose metric is within k standard errors of the best informative
   trial's (k = se_multiplier), and within `tolerance` of it when set;
4. gap-tied: contenders whose gap exceeds the smallest contender gap by at most k combined standard
   errors; the winner is the gap-tied contender with the best metric (ties: smaller gap).
"""

from __future__ import annotations

import math
from typing import Any

from pqfn.config import SelectionConfig
from pqfn.records import COMPLETED, STATUSES, Selection, TrialOutcome

MIN_RECALL = "val/min_recall"


def search_objective(rec: dict[str, float], sel: SelectionConfig) -> float:
    """What the single-objective searcher minimises: the gap, plus penalties for learning too little.

    objective = gap + 2 * max(0, floor - metric) + 2 * max(0, min_class_recall - val/min_recall)
    so the searcher is not drawn to configurations that learn nothing or miss a class (gap ~ 0).
    """
    penalty = max(0.0, (sel.floor or 0.0) - rec[sel.metric])
    penalty += max(0.0, (sel.min_class_recall or 0.0) - rec.get(MIN_RECALL, 1.0))
    return rec[sel.gap_metric] + 2.0 * penalty


def pareto_front(rows: list[TrialOutcome], metric: str, gap_metric: str) -> list[TrialOutcome]:
    """Completed trials not dominated in (higher metric, lower gap)."""
    done = [r for r in rows if r.status == COMPLETED and math.isfinite(r.get(metric)) and math.isfinite(r.get(gap_metric))]
    front = []
    for r in done:
        dominated = any(
            o.get(metric) >= r.get(metric) and o.get(gap_metric) <= r.get(gap_metric)
            and (o.get(metric) > r.get(metric) or o.get(gap_metric) < r.get(gap_metric))
            for o in done
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r.get(metric))


def _se(r: TrialOutcome, key: str) -> float:
    se = r.se(key)
    return se if math.isfinite(se) else 0.0


def _within(a: TrialOutcome, b: TrialOutcome, key: str, k: float) -> tuple[float, float]:
    """(a - b, k combined standard errors) for one metric."""
    return a.get(key) - b.get(key), k * math.hypot(_se(a, key), _se(b, key))


def rule_text(sel: SelectionConfig) -> str:
    m, g, k = sel.metric, sel.gap_metric, sel.se_multiplier
    parts = [f"{m} >= {sel.floor}" if sel.floor is not None else "",
             f"every class's recall >= {sel.min_class_recall}" if sel.min_class_recall is not None else ""]
    guard = " and ".join(p for p in parts if p) or "any"
    tol = f" (and within {sel.tolerance})" if sel.tolerance is not None else ""
    return (f"informative = completed with {guard}; contenders = informative with {m} within {k:g} SE of the best{tol}; "
            f"winner = among contenders whose {g} is within {k:g} SE of the smallest, the best {m}")


def select(rows: list[TrialOutcome], sel: SelectionConfig) -> Selection:
    m, g, k = sel.metric, sel.gap_metric, sel.se_multiplier
    counts: dict[str, int] = {s: sum(r.status == s for r in rows) for s in STATUSES}
    rule = sel.model_dump(mode="json") | {"text": rule_text(sel)}
    out = Selection(rule=rule, counts=counts,
                    pareto_front=[_brief(r, sel) for r in pareto_front(rows, m, g)])
    done = [r for r in rows if r.status == COMPLETED and math.isfinite(r.get(m)) and math.isfinite(r.get(g))]
    if not done:
        out.reason = "no trial completed its full epoch budget"
        return out
    out.best = _brief(max(done, key=lambda r: r.get(m)), sel)
    verdict: dict[str, str] = {}
    informative = []
    for r in done:
        if sel.floor is not None and r.get(m) < sel.floor:
            verdict[r.trial_id] = f"not informative: {m} {r.get(m):.3f} < floor {sel.floor}"
        elif sel.min_class_recall is not None and r.get(MIN_RECALL) < sel.min_class_recall:
            verdict[r.trial_id] = (f"not informative: worst class recall {r.get(MIN_RECALL):.3f} < "
                                   f"{sel.min_class_recall} (blind to a class)")
        else:
            informative.append(r)
    if not informative:
        out.candidates = [_brief(r, sel) | {"verdict": verdict[r.trial_id]} for r in done]
        out.reason = (f"no completed trial is informative: the best {m} is {out.best[m]:.3f}; see candidates "
                      "(lower selection.floor / selection.min_class_recall only if you accept a weaker model)")
        return out
    top = max(informative, key=lambda r: (r.get(m), -r.get(g)))
    contenders = []
    for r in informative:
        d, noise = _within(r, top, m, k)
        if -d > noise:
            verdict[r.trial_id] = f"{m} {-d:.3f} below the best ({-d / max(noise / k if k else 1e-12, 1e-12):.1f} SE)"
        elif sel.tolerance is not None and -d > sel.tolerance:
            verdict[r.trial_id] = f"{m} {-d:.3f} below the best, more than tolerance {sel.tolerance}"
        else:
            contenders.append(r)
    least = min(contenders, key=lambda r: (r.get(g), -r.get(m)))
    gap_tied = []
    for r in contenders:
        d, noise = _within(r, least, g, k)
        if d > noise:
            verdict[r.trial_id] = f"contender; {g} {d:+.3f} above the smallest (outside {k:g} SE)"
        else:
            gap_tied.append(r)
    win = max(gap_tied, key=lambda r: (r.get(m), -r.get(g)))
    for r in gap_tied:
        verdict[r.trial_id] = "selected" if r is win else f"tied on {g}; lower {m}"
    out.selected = _brief(win, sel) | {"metrics": dict(win.metrics)}
    for r in contenders:
        if r is win:
            continue
        dm, nm = _within(r, win, m, k)
        dg, ng = _within(r, win, g, k)
        if abs(dm) <= nm and abs(dg) <= ng:
            out.tied.append(_brief(r, sel) | {f"delta {m}": dm, f"delta {g}": dg})
    out.candidates = [_brief(r, sel) | {"verdict": verdict[r.trial_id]} for r in done]
    others = [r for r in contenders if r is not win]
    lead = ""
    if others:
        nxt = min(others, key=lambda r: r.get(g))
        dg, ng = _within(nxt, win, g, 1.0)
        lead = (f"; next-smallest {g} among contenders: trial {nxt.trial_id}, {dg:+.3f} "
                f"({dg / ng:.1f} SE)" if ng > 0 else f"; next contender {nxt.trial_id}: {g} {dg:+.3f}")
    out.reason = (
        f"{len(informative)} of {len(done)} completed trials are informative, {len(contenders)} within {k:g} SE of the "
        f"best {m}, {len(gap_tied)} of those tied on the smallest {g}; trial {win.trial_id} has {m} "
        f"{win.get(m):.3f} +- {_se(win, m):.3f} SE and {g} {win.get(g):+.3f} +- {_se(win, g):.3f} SE"
        + (f"; {len(out.tied)} trial(s) statistically tied with it" if out.tied else "") + lead
    )
    return out


def _brief(r: TrialOutcome, sel: SelectionConfig) -> dict[str, Any]:
    keys = dict.fromkeys((sel.metric, "val/acc", MIN_RECALL, sel.gap_metric))
    return r.brief() | {key: r.get(key) for key in keys} | {
        f"{sel.metric}_se": _se(r, sel.metric), f"{sel.gap_metric}_se": _se(r, sel.gap_metric)}
