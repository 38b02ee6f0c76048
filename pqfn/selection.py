"""Selection of the least-overfitting configuration that is still informative (no Ray needed).

Three traps shape the rule (design.md, "The flow of one sweep", step 8; README "Sweeps"):

- a configuration that learns less has a smaller gap (one blind to bond-pad patches at low
  resolution merges B into D and "wins"; batch 64 at a fixed epoch budget takes 8x fewer steps), so
  a trial is informative only if its balanced metric clears a floor AND every class is found, and a
  trial may trade metric for a smaller gap only by an amount it is SHOWN to stay within;
- with 3-5 folds most differences lie inside the fold noise, and noise must never help a trial: a
  comparison that needs evidence fails for a noisy trial, and the gap is judged at its upper bound;
- a missing or non-finite input is not evidence: such a trial is not informative, and says why.

Noise. The standard error of a k-fold mean is corrected for overlapping training sets (Nadeau and
Bengio 2003): var = s^2 * (1/k + n_val/n_train), n_val/n_train = 1/(k-1) for equal folds, instead of
s^2 / k (the plain formula is too small by a factor 2.5 at 3 folds). With repeated cross-validation
(trial.repeats = r: k folds drawn r times) the n = k r fold scores give var = s^2 * (1/n + 1/(k-1))
(Bouckaert and Frank 2004): repeats shrink the first term, never the overlap term. Two trials that share folds
(the same trial.data_size, folds, seed and max_copies: the same images in each fold and the same initial
weights) are compared by their per-fold differences (paired: what the folds share, an easy or a hard
fold, cancels); others by the two trials' corrected errors combined (unpaired). A difference is
"within noise" when it is at most se_multiplier (k) such standard errors (k-1 degrees of freedom).

The rule in steps (SelectionConfig documents the keys):

1. only COMPLETED trials (an ASHA-stopped trial's early gap is small because nothing has overfit yet);
2. informative: every input finite; metric >= floor; val/min_recall >= min_class_recall; gap <= max_gap;
3. the reference is the informative trial with the best metric; contenders are the trials SHOWN to be
   within `tolerance` of it: shortfall + k * SE(shortfall) <= tolerance (a non-inferiority test, so a
   noisy trial cannot slip in); without a tolerance, those not shown below it (shortfall <= k * SE);
4. the reference stays unless a contender's gap is SHOWN smaller: its gap at its upper bound, gap + k * SE(gap),
   is below the reference's gap; among the reference and those, the winner has the smallest gap at its upper
   bound (ties: the better metric). Trials whose metric and gap both lie within noise of the winner's are named tied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pqfn.config import SelectionConfig
from pqfn.records import COMPLETED, STATUSES, Selection, TrialOutcome, overlap_factor

MIN_RECALL = "val/min_recall"
# The trial settings that decide a trial's folds (pqfn.splits.build_pool / make_folds) and its initial
# weights (pqfn.trial: seed * 1000 + fold): trials equal in all of them see the same images in each fold.
FOLD_KEYS = ("trial.data_size", "trial.folds", "trial.repeats", "trial.seed", "trial.max_copies")


def _finite(rec: dict[str, float], key: str, default: float) -> float:
    v = rec.get(key, math.nan)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else default


def search_objective(rec: dict[str, float], sel: SelectionConfig) -> float:
    """What the single-objective searcher minimises: what the selection rewards, never fitting less.

    objective = -metric + 2 * max(0, min_class_recall - val/min_recall) + 2 * max(0, gap - max_gap)

    The selection starts from the best metric and trades it only for a smaller gap it can show, so the
    searcher looks for a high metric. The gap enters only as a constraint (max_gap, off by default): as
    a prize (the earlier `gap + penalties`) it drew the search to configurations that fit less (batch 64
    at a fixed epoch budget, a tiny learning rate). A missing or non-finite input counts as the worst
    value (metric 0, recall 0), never as a good one.
    """
    obj = -_finite(rec, sel.metric, 0.0)
    if sel.min_class_recall is not None:
        obj += 2.0 * max(0.0, sel.min_class_recall - _finite(rec, MIN_RECALL, 0.0))
    if sel.max_gap is not None:
        obj += 2.0 * max(0.0, _finite(rec, sel.gap_metric, 1.0) - sel.max_gap)
    return obj


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


@dataclass(frozen=True)
class Difference:
    """a - b for one metric, with its corrected standard error."""

    value: float
    se: float
    paired: bool  # from per-fold differences on shared folds; else the two trials' errors combined

    def text(self) -> str:
        return f"{self.value:+.3f} (SE {self.se:.3f}, {'paired by fold' if self.paired else 'unpaired'})"


def shares_folds(a: TrialOutcome, b: TrialOutcome) -> bool:
    """Same folds and initial weights: equal fold-deciding settings (an unsearched one is the same for all)."""
    return a.get("n_folds") == b.get("n_folds") and a.repeats() == b.repeats() and all(a.params.get(k) == b.params.get(k) for k in FOLD_KEYS)


def fold_values(r: TrialOutcome, key: str) -> np.ndarray | None:
    """The per-fold values `fold{k}/key`, or None when any is missing or not finite."""
    n = r.get("n_folds")
    if not math.isfinite(n) or n < 2:
        return None
    v = np.array([r.get(f"fold{k}/{key}") for k in range(1, int(n) + 1)])
    return v if np.isfinite(v).all() else None


def difference(a: TrialOutcome, b: TrialOutcome, key: str) -> Difference:
    """a - b on `key`: paired by fold when the two share folds (and both have per-fold values), else unpaired."""
    d = a.get(key) - b.get(key)
    if a is b:
        return Difference(0.0, 0.0, True)
    fa, fb = fold_values(a, key), fold_values(b, key)
    if shares_folds(a, b) and fa is not None and fb is not None:
        return Difference(d, float(np.std(fa - fb, ddof=1)) * math.sqrt(overlap_factor(len(fa), a.repeats())), True)
    return Difference(d, math.hypot(a.se(key), b.se(key)), False)


def missing_inputs(r: TrialOutcome, sel: SelectionConfig) -> list[str]:
    """The selection's inputs that are missing or not finite (each makes the trial not informative)."""
    keys = [sel.metric, f"{sel.metric}_std", sel.gap_metric, f"{sel.gap_metric}_std", "n_folds"]
    if sel.min_class_recall is not None:
        keys.append(MIN_RECALL)
    bad = [k for k in keys if not math.isfinite(r.get(k))]
    if "n_folds" not in bad and r.get("n_folds") < 2 * r.repeats():
        bad.append("n_folds (fewer than 2 folds per repeat: no noise estimate)")
    return bad


def upper_gap(r: TrialOutcome, sel: SelectionConfig) -> float:
    """The gap at its upper bound: gap + k corrected standard errors (noise counts against a trial)."""
    return r.get(sel.gap_metric) + sel.se_multiplier * r.se(sel.gap_metric)


def rule_text(sel: SelectionConfig) -> str:
    m, g, k = sel.metric, sel.gap_metric, sel.se_multiplier
    parts = ["every input finite",
             f"{m} >= {sel.floor}" if sel.floor is not None else "",
             f"every class's recall >= {sel.min_class_recall}" if sel.min_class_recall is not None else "",
             f"{g} <= {sel.max_gap}" if sel.max_gap is not None else ""]
    guard = " and ".join(p for p in parts if p)
    near = (f"shown within {sel.tolerance} of the best {m} (shortfall + {k:g} SE <= {sel.tolerance})"
            if sel.tolerance is not None else f"{m} not shown below the best (shortfall <= {k:g} SE)")
    return (f"informative = completed with {guard}; contenders = informative trials {near}, SE paired by fold where "
            f"trials share folds, corrected for overlapping training sets; the best stays unless a contender's "
            f"{g} + {k:g} SE is below the best's {g}; winner = the smallest {g} + {k:g} SE among those")


def select(rows: list[TrialOutcome], sel: SelectionConfig) -> Selection:
    m, g, k = sel.metric, sel.gap_metric, sel.se_multiplier
    counts: dict[str, int] = {s: sum(r.status == s for r in rows) for s in STATUSES}
    rule = sel.model_dump(mode="json") | {"text": rule_text(sel)}
    out = Selection(rule=rule, counts=counts,
                    pareto_front=[_brief(r, sel) for r in pareto_front(rows, m, g)])
    done = [r for r in rows if r.status == COMPLETED]
    if not done:
        out.reason = "no trial completed its full epoch budget"
        return out
    scored = [r for r in done if math.isfinite(r.get(m))]
    if scored:
        out.best = _brief(max(scored, key=lambda r: r.get(m)), sel)
    verdict: dict[str, str] = {}
    informative = []
    for r in done:
        bad = missing_inputs(r, sel)
        if bad:
            verdict[r.trial_id] = f"not informative: missing or non-finite {', '.join(bad)}"
        elif sel.floor is not None and r.get(m) < sel.floor:
            verdict[r.trial_id] = f"not informative: {m} {r.get(m):.3f} < floor {sel.floor}"
        elif sel.min_class_recall is not None and r.get(MIN_RECALL) < sel.min_class_recall:
            verdict[r.trial_id] = (f"not informative: worst class recall {r.get(MIN_RECALL):.3f} < "
                                   f"{sel.min_class_recall} (blind to a class)")
        elif sel.max_gap is not None and r.get(g) > sel.max_gap:
            verdict[r.trial_id] = f"not informative: {g} {r.get(g):+.3f} > max_gap {sel.max_gap}"
        else:
            informative.append(r)
    if not informative:
        out.candidates = [_brief(r, sel) | {"verdict": verdict[r.trial_id]} for r in done]
        best = f"the best {m} is {out.best[m]:.3f}" if out.best else f"no trial has a finite {m}"
        out.reason = (f"no completed trial is informative: {best}; see candidates "
                      "(lower selection.floor / selection.min_class_recall only if you accept a weaker model)")
        return out
    top = max(informative, key=lambda r: (r.get(m), -r.get(g)))
    contenders = []
    for r in informative:
        d = difference(top, r, m)  # the shortfall: best - this
        if sel.tolerance is not None and d.value + k * d.se > sel.tolerance:
            verdict[r.trial_id] = (f"{m} {d.value:.3f} below the best (trial {top.trial_id}), SE {d.se:.3f} "
                                   f"{'paired by fold' if d.paired else 'unpaired'}: not shown within {sel.tolerance}")
        elif sel.tolerance is None and d.value > k * d.se:
            verdict[r.trial_id] = (f"{m} {d.value:.3f} below the best (trial {top.trial_id}), "
                                   f"{d.value / d.se if d.se else math.inf:.1f} SE "
                                   f"{'paired by fold' if d.paired else 'unpaired'}")
        else:
            contenders.append(r)
    # The best gives up its place only to a contender whose gap, even at its upper bound (gap + k SE), is below
    # the best's gap: the burden of proof is on the trade, and the contender's noise counts against it. Without
    # this, two upper bounds 0.006 apart (gaps +0.005 +- 0.052 and +0.020 +- 0.043 SE, one measured sweep)
    # swapped the best metric away for a gap that was no smaller within its noise.
    shown = [r for r in contenders if r is top or upper_gap(r, sel) < top.get(g)]
    for r in contenders:
        if r not in shown:
            verdict[r.trial_id] = (f"contender; {g} + {k:g} SE = {upper_gap(r, sel):+.3f} is not below the best's "
                                   f"{g} {top.get(g):+.3f} (trial {top.trial_id}): a smaller gap is not shown")
    win = min(shown, key=lambda r: (upper_gap(r, sel), -r.get(m)))
    verdict[win.trial_id] = "selected"
    for r in shown:
        if r is not win:
            verdict[r.trial_id] = (f"contender; {g} + {k:g} SE = {upper_gap(r, sel):+.3f} (selected trial: "
                                   f"{upper_gap(win, sel):+.3f}" + (", equal; lower metric)" if upper_gap(r, sel) == upper_gap(win, sel)
                                                                     else ")"))
    out.selected = _brief(win, sel) | {"metrics": dict(win.metrics)}
    for r in contenders:
        if r is win:
            continue
        dm, dg = difference(r, win, m), difference(r, win, g)
        if abs(dm.value) <= k * dm.se and abs(dg.value) <= k * dg.se:
            out.tied.append(_brief(r, sel) | {f"delta {m}": dm.value, f"delta {g}": dg.value,
                                              "paired": dm.paired})
    out.candidates = [_brief(r, sel) | {"verdict": verdict[r.trial_id]} for r in done]
    lead = ""
    others = [r for r in contenders if r is not win]
    if others:
        nxt = min(others, key=lambda r: (upper_gap(r, sel), -r.get(m)))
        lead = f"; next contender: trial {nxt.trial_id}, {g} {difference(nxt, win, g).text()} against the selected"
    out.reason = (
        f"{len(informative)} of {len(done)} completed trials are informative, {len(contenders)} shown close enough "
        f"to the best {m} (trial {top.trial_id}, {top.get(m):.3f}); trial {win.trial_id} has the smallest {g} at its "
        f"upper bound: {m} {win.get(m):.3f} +- {win.se(m):.3f} SE, {g} {win.get(g):+.3f} +- {win.se(g):.3f} SE"
        + (f"; {len(out.tied)} trial(s) statistically tied with it" if out.tied else "") + lead
    )
    return out


def _brief(r: TrialOutcome, sel: SelectionConfig) -> dict[str, Any]:
    keys = dict.fromkeys((sel.metric, "val/acc", MIN_RECALL, sel.gap_metric))
    return r.brief() | {key: r.get(key) for key in keys} | {
        f"{sel.metric}_se": r.se(sel.metric), f"{sel.gap_metric}_se": r.se(sel.gap_metric)}
