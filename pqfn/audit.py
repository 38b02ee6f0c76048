"""Hindsight audit: did the selection rule pick well? Scored on the held-out packages AFTER the selection.

Every completed trial saved its fold models (trials/<id>/models.safetensors), so each can be scored
on the held-out packages as if it had been selected: its fold ensemble, prior-corrected the way the
final evaluation would have corrected it (strength chosen on that trial's own out-of-fold
predictions), at the trial's resolution. The audit reports, clearly labelled as hindsight:

- each trial's held-out accuracy, balanced accuracy and macro-F1 with package-bootstrap intervals;
- the Spearman correlation between the cross-validation ranking (the selection metric) and the
  held-out ranking (its held-out counterpart);
- the selection's regret: the best held-out figure minus the selected trial's, with the paired
  package-bootstrap interval of that difference (is the regret beyond the held-out noise?).

It is NEVER used to select: choosing by these figures would turn the held-out packages into a
validation set and their figures into optimistic ones. It is written to audit.json and the W&B summary
run; the sweep's console shows it only with evaluate.audit_console (off by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pqfn.bootstrap import METRICS, classification_intervals, paired_difference
from pqfn.config import CLASSES, Config, with_overrides
from pqfn.data import Dataset
from pqfn.ensemble import MODELS_FILE, adjust, choose_strength, load_members, load_oof, natural_priors
from pqfn.errors import PqfnError
from pqfn.io import atomic_write_text, strict_json
from pqfn.records import COMPLETED, Selection, TrialOutcome
from pqfn.splits import HoldOut

AUDIT_FILE = "audit.json"
LABEL = ("HINDSIGHT: every trial's fold ensemble scored on the held-out packages after the selection, to show "
         "whether the rule picked well; never used to select")
HELD_OUT = {"val/bal_acc": "bal_acc", "val/f1": "f1", "val/acc": "acc"}  # the selection metric's held-out twin


def _spearman(a: list[float], b: list[float]) -> tuple[float | None, str]:
    """(rho, "") or (None, why it is undefined): fewer than 3 ranked trials, or a ranking without two values."""
    if len(a) < 3:
        return None, f"undefined: {len(a)} trial(s) ranked, a rank correlation needs at least 3"
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None, "undefined: every trial has the same cross-validated or held-out figure"
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return (float(rho), "") if np.isfinite(rho) else (None, "undefined")


def audit_sweep(cfg: Config, sdir: Path, rows: list[TrialOutcome], selection: Selection, ds: Dataset,
                holdout: HoldOut, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score every completed trial's fold ensemble on the held-out packages (see the module docstring)."""
    from pqfn.evaluate import predict_rows
    from pqfn.trial import pick_device

    m, key = cfg.selection.metric, HELD_OUT[cfg.selection.metric]
    ev = cfg.evaluate
    priors = np.asarray(ev.priors, np.float64) if ev.priors is not None else natural_priors(ds.labels[holdout.pool])
    y, groups = ds.labels[holdout.test], ds.package_ids[holdout.test]
    verdicts = {c["trial_id"]: c.get("verdict", "") for c in selection.candidates}
    selected = selection.selected["trial_id"] if selection.selected else None
    trials: list[dict[str, Any]] = []
    preds: dict[str, np.ndarray] = {}
    for r in rows:
        if r.status != COMPLETED:
            continue
        entry: dict[str, Any] = {"trial_id": r.trial_id, "params": r.params, "verdict": verdicts.get(r.trial_id, ""),
                                 f"cv {m}": r.get(m), f"cv {cfg.selection.gap_metric}": r.get(cfg.selection.gap_metric)}
        folder = sdir / "trials" / r.trial_id
        if not (folder / MODELS_FILE).exists():
            trials.append(entry | {"skipped": f"no fold models in {folder}"})
            continue
        tc = with_overrides(cfg, r.params).trial
        try:
            model = load_members(folder, tc.model)
            raw = predict_rows(tc, model, ds, holdout.test, pick_device(tc.device))
            if ev.prior_strength == "auto":
                idx, oof_logits = load_oof(folder)
                strength, _ = choose_strength(ds.labels[idx], oof_logits, priors, ds.package_ids[idx])
            else:
                strength = float(ev.prior_strength)
        except PqfnError as e:
            trials.append(entry | {"skipped": str(e)})
            continue
        pred = adjust(raw, priors, strength).argmax(1)
        preds[r.trial_id] = pred
        iv = classification_intervals(y, pred, groups, len(CLASSES))
        raw_iv = classification_intervals(y, raw.argmax(1), groups, len(CLASSES))
        trials.append(entry | {"prior_strength": strength,
                               "held_out": {k: iv[k].to_dict() for k in METRICS},
                               "held_out_raw": {k: raw_iv[k].value for k in METRICS}})
    scored = [t for t in trials if "held_out" in t]
    out: dict[str, Any] = {
        "label": LABEL, "metric": m, "held_out_metric": key, "n_test_images": int(len(holdout.test)),
        "n_test_packages": int(len(np.unique(groups))), "selected": selected, "trials": trials,
        "n_ranked": len(scored),
    }
    rho, why = _spearman([t[f"cv {m}"] for t in scored], [t["held_out"][key]["value"] for t in scored])
    out |= {"spearman": rho} | ({"spearman_note": why} if why else {})
    if scored and selected in preds:
        best = max(scored, key=lambda t: t["held_out"][key]["value"])
        sel = next(t for t in scored if t["trial_id"] == selected)
        diff = paired_difference(y, preds[best["trial_id"]], preds[selected], groups, len(CLASSES))[key]
        out |= {
            "best_held_out": best["trial_id"],
            "regret": best["held_out"][key]["value"] - sel["held_out"][key]["value"],
            "regret_interval": diff.to_dict(),
            "beat_the_selected": [{"trial_id": t["trial_id"], key: t["held_out"][key]["value"], "verdict": t["verdict"]}
                                  for t in scored if t["held_out"][key]["value"] > sel["held_out"][key]["value"]],
        }
    return out


def _num(v: float | None, fmt: str = ".3f") -> str:
    """A bound as text; n/a where it is undefined (None in audit.json, NaN before writing: too few packages)."""
    return "n/a" if v is None or not math.isfinite(v) else format(v, fmt)


def lines(audit: dict[str, Any]) -> list[str]:
    """The audit as console lines."""
    key = audit["held_out_metric"]
    out = [f"hindsight audit ({audit['label'].split(':', 1)[1].strip()}):"]
    for t in audit["trials"]:
        params = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in t["params"].items())
        if "held_out" not in t:
            out.append(f"  {t['trial_id']} ({params}): skipped: {t['skipped']}")
            continue
        iv = t["held_out"][key]
        mark = " <- selected" if t["trial_id"] == audit["selected"] else ""
        out.append(f"  {t['trial_id']} ({params}): cv {audit['metric']} {t['cv ' + audit['metric']]:.3f}, held-out {key} "
                   f"{iv['value']:.3f} [{_num(iv['lo'])}, {_num(iv['hi'])}]{mark}")
    rho = audit["spearman"]
    out.append(f"  Spearman (cv ranking vs held-out ranking, {audit['n_ranked']} trials): "
               + (f"{rho:.2f}" if rho is not None else audit.get("spearman_note", "undefined")))
    if "regret" in audit:
        r = audit["regret_interval"]
        out.append(f"  regret (best held-out {audit['best_held_out']} minus selected): {audit['regret']:.3f} "
                   f"(paired 95 % interval [{_num(r['lo'], '+.3f')}, {_num(r['hi'], '+.3f')}])")
    return out


def write_audit(sdir: Path, audit: dict[str, Any]) -> Path:
    path = sdir / AUDIT_FILE
    atomic_write_text(path, strict_json(audit, indent=2))  # an undefined figure (a tiny set's interval) is null
    return path


def run_audit(cfg: Config, sdir: Path, rows: list[TrialOutcome], selection: Selection, ds: Dataset, holdout: HoldOut,
              *, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The sweep's audit step: audit.json always (when evaluate.audit), the console only with evaluate.audit_console."""
    if not cfg.evaluate.audit:
        return None
    audit = audit_sweep(cfg, sdir, rows, selection, ds, holdout, log=log)
    write_audit(sdir, audit)
    if cfg.evaluate.audit_console:
        for line in lines(audit):
            log(line)
    return audit
