"""Held-out evaluation of a final model (the selected trial's fold ensemble) on packages the search never saw.

Test images are never augmented and keep their natural class balance. The balanced-pool model's
outputs are corrected for the natural class priors (pqfn.ensemble); both the raw and the corrected
figures are reported, beside the trivial baselines (always the majority class; chance) and the cheap
ones (pqfn.baselines: intensity statistics, metadata), fitted on the same pool and corrected by the
same rule. Every figure has a package-bootstrap interval (pqfn.bootstrap), and the CNN minus the best
cheap baseline (the best in cross-validation, chosen before the held-out packages are looked at) has a
paired one: the verdict says in words whether the CNN beats it, is tied with it, or loses. Metrics
come from scikit-learn: confusion matrix, per-class precision / recall / F1 and their macro means
(the reference study's Fig. 7), plus predicted delamination by metallization and thermal cycles
(its Fig. 8) when that metadata exists.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from pqfn import bootstrap
from pqfn.baselines import make_baselines, out_of_fold
from pqfn.bundle import data_fingerprint, write_bundle
from pqfn.calibration import brier_score, expected_calibration_error, plot_reliability
from pqfn.config import CLASSES, Config, EvaluateConfig, TrialConfig, with_overrides
from pqfn.data import Dataset
from pqfn.device import driver_device
from pqfn.ensemble import (
    FoldEnsemble,
    adjust,
    choose_strength,
    load_members,
    load_oof,
    natural_priors,
    softmax,
)
from pqfn.errors import DataError
from pqfn.explain import localisation_report
from pqfn.records import Selection
from pqfn.report import atomic_write, write_evaluation
from pqfn.splits import HoldOut, build_pool, make_folds, repeated_folds
from pqfn.trial import TrialImages, predict_logits


@dataclass(frozen=True)
class Prediction:
    """Held-out predictions: raw ensemble logits and the prior-corrected ones the model reports."""

    index: np.ndarray  # (N,) dataset rows
    raw_logits: np.ndarray  # (N, classes): log of the ensemble's mean probability, equal priors
    priors: np.ndarray  # (classes,) natural class frequencies
    strength: float  # logits + strength * log(priors)

    @property
    def logits(self) -> np.ndarray:
        return adjust(self.raw_logits, self.priors, self.strength)

    @property
    def probs(self) -> np.ndarray:
        return softmax(self.logits)

    @property
    def raw_probs(self) -> np.ndarray:
        return softmax(self.raw_logits)


def predict_rows(cfg: TrialConfig, model: torch.nn.Module, ds: Dataset, rows: np.ndarray,
                 device: torch.device) -> np.ndarray:
    """Logits (N, classes) for ds[rows], resized to the model's resolution, never augmented."""
    data = TrialImages(ds, rows, cfg.resolution, device, reduce=cfg.reduce)
    return predict_logits(cfg, model.to(device), data.images[data.rows(rows)], device).cpu().numpy()


def baselines(y_train_priors: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """What trivial classifiers score on these labels: always the pool's most frequent class, and chance."""
    majority = int(np.argmax(y_train_priors))
    pred = np.full_like(y, majority)
    return {
        "majority_class": CLASSES[majority],
        "majority_accuracy": float(accuracy_score(y, pred)),
        "majority_balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "majority_macro_f1": float(f1_score(y, pred, labels=list(range(len(CLASSES))), average="macro", zero_division=0)),
        "chance_balanced_accuracy": 1.0 / len(CLASSES),
    }


def holdout_metrics(ds: Dataset, test: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    y = ds.labels[test]
    labels = list(range(len(CLASSES)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "n_test_images": len(test),
        "n_test_packages": len(np.unique(ds.package_ids[test])),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_precision": float(p.mean()),
        "macro_recall": float(r.mean()),
        "macro_f1": float(f.mean()),
        "classes": list(CLASSES),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),  # rows true, columns predicted
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(CLASSES)
        },
    }
    known = (ds.cycles[test] >= 0) & (ds.metallization[test] != "")
    if known.any():
        delam_pred = pred != CLASSES.index("D")
        delam_true = y != CLASSES.index("D")
        table = []
        for m in sorted(set(ds.metallization[test][known])):
            for c in sorted(set(ds.cycles[test][known])):
                sel = known & (ds.metallization[test] == m) & (ds.cycles[test] == c)
                if sel.any():
                    table.append({
                        "metallization": str(m), "cycles": int(c), "n": int(sel.sum()),
                        "predicted_delaminated": float(delam_pred[sel].mean()),
                        "true_delaminated": float(delam_true[sel].mean()),
                        "predicted_die_pad": float(np.isin(pred[sel], [0, 2]).mean()),
                        "predicted_bond_pad": float(np.isin(pred[sel], [1, 2]).mean()),
                    })
        out["by_metallization_cycles"] = table
    return out


def verdict(m: dict[str, Any]) -> str:
    """One sentence: does the model beat the trivial baselines on the held-out packages?"""
    b = m["baselines"]
    short = []
    if m["accuracy"] <= b["majority_accuracy"]:
        short.append(f"accuracy {m['accuracy']:.3f} <= always-{b['majority_class']} {b['majority_accuracy']:.3f}")
    if m["balanced_accuracy"] <= b["chance_balanced_accuracy"] + 0.05:
        short.append(f"balanced accuracy {m['balanced_accuracy']:.3f} is near chance {b['chance_balanced_accuracy']:.2f}")
    if m["macro_f1"] <= b["majority_macro_f1"]:
        short.append(f"macro-F1 {m['macro_f1']:.3f} <= always-{b['majority_class']} {b['majority_macro_f1']:.3f}")
    if short:
        return "DOES NOT BEAT the trivial baselines: " + "; ".join(short) + " (README, Troubleshooting)"
    return (f"beats the trivial baselines: accuracy {m['accuracy']:.3f} vs always-{b['majority_class']} {b['majority_accuracy']:.3f}, "
            f"balanced accuracy {m['balanced_accuracy']:.3f} vs chance {b['chance_balanced_accuracy']:.2f}")


BASELINE_NAMES = {"intensity": "intensity statistics", "metadata": "metadata (metallization, cycles)"}


def describe_baseline(name: str, size: int | None = None) -> str:
    """'intensity statistics at 96 px': the baseline's name in words, with its analysis size when it has one."""
    return BASELINE_NAMES.get(name, name) + (f" at {size} px" if size else "")


_INTERVAL_NAMES = {"acc": "accuracy", "bal_acc": "balanced_accuracy", "f1": "macro_f1"}


def named_intervals(iv: dict[str, bootstrap.Interval]) -> dict[str, Any]:
    """bootstrap's keys (acc, bal_acc, f1, recall_<i>) -> evaluation.json's (accuracy, ..., recall_A)."""
    out: dict[str, Any] = {}
    for k, v in iv.items():
        name = _INTERVAL_NAMES.get(k) or (f"recall_{CLASSES[int(k.split('_')[1])]}" if k.startswith("recall_") else k)
        out[name] = v.to_dict()
    return out


def cheap_baselines(cfg: TrialConfig, ev: EvaluateConfig, ds: Dataset, holdout: HoldOut, entries: np.ndarray,
                    priors: np.ndarray) -> dict[str, dict[str, Any]]:
    """Each cheap baseline fitted on the trial's pool `entries` (the CNN's training images) and predicting the
    held-out packages, prior-corrected by the CNN's rule on its own out-of-fold predictions (the trial's folds)."""
    folds = make_folds(ds, entries, cfg.folds, cfg.seed)
    out: dict[str, dict[str, Any]] = {}
    # the analysis size chosen on exactly the trial's folds (every repeat), as in its per-fold records
    trial_folds = repeated_folds(ds, entries, cfg.folds, cfg.repeats, cfg.seed)
    for b in make_baselines(ds, np.concatenate([entries, holdout.test]), trial_folds):
        oof_idx, oof_lp = out_of_fold(b, ds.labels, folds)
        if ev.prior_strength == "auto":
            strength, _ = choose_strength(ds.labels[oof_idx], oof_lp, priors, ds.package_ids[oof_idx])
        else:
            strength = float(ev.prior_strength)
        raw = b.log_probs(b.fit(entries, ds.labels), holdout.test)
        out[b.name] = {
            "pred": adjust(raw, priors, strength).argmax(1), "raw_pred": raw.argmax(1), "prior_strength": strength,
            "cv_balanced_accuracy": float(balanced_accuracy_score(ds.labels[oof_idx], oof_lp.argmax(1))),
            "analysis_size": b.size,
        }
    return out


# The four classes are two findings: die-pad delamination (A, C) and bond-pad delamination (B, C).
FINDINGS = {"die_pad": ("A", "C"), "bond_pad": ("B", "C")}


def _finding_rates(said: np.ndarray, truth: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """Accuracy, sensitivity and specificity of one finding's yes/no answers, with package-bootstrap intervals."""
    nan = {"value": float("nan"), "lo": float("nan"), "hi": float("nan")}
    r = {"accuracy": bootstrap.rate_interval(said == truth, groups).to_dict()}
    for key, where, want in (("sensitivity", truth, True), ("specificity", ~truth, False)):
        r[key] = bootstrap.rate_interval(said[where] == want, groups[where]).to_dict() if where.any() else nan
    return r


def finding_rates(y: np.ndarray, pred: np.ndarray, other: np.ndarray | None, groups: np.ndarray) -> dict[str, Any]:
    """Per finding: how often the model's answer on that finding alone is right (accuracy), on the scans that
    have it (sensitivity) and on those that do not (specificity), with package-bootstrap intervals; with
    `other` (the best cheap baseline's predictions), the same for it and the paired difference in accuracy.
    A four-class score hides WHICH finding a model misses; this says it."""
    out: dict[str, Any] = {}
    for name, classes in FINDINGS.items():
        idx = [CLASSES.index(c) for c in classes]
        truth = np.isin(y, idx)
        out[name] = {"classes": list(classes), "cnn": _finding_rates(np.isin(pred, idx), truth, groups),
                     "n_with": int(truth.sum()), "n_without": int((~truth).sum())}
        if other is not None:
            out[name]["baseline"] = _finding_rates(np.isin(other, idx), truth, groups)
            d = bootstrap.paired_rate_difference(np.isin(pred, idx) == truth, np.isin(other, idx) == truth, groups)
            out[name]["cnn_minus_baseline_accuracy"] = d.to_dict() | {"outcome": bootstrap.verdict(d)}
    return out


def compare_with_baselines(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, cheap: dict[str, dict[str, Any]],
                           majority: int) -> dict[str, Any]:
    """Package-bootstrap intervals for the CNN, every baseline, and the paired CNN-minus-best-baseline difference.

    The best cheap baseline is the one with the best cross-validated balanced accuracy on the pool (chosen
    without the held-out packages). Verdict: 'beats' when the intervals of the differences in balanced
    accuracy and macro-F1 both lie above 0, 'loses' when either lies below 0, 'tied' otherwise.
    """
    k = len(CLASSES)
    res: dict[str, Any] = {"intervals": named_intervals(bootstrap.classification_intervals(y, pred, groups, k))}
    trivial = np.full_like(y, majority)
    res["majority_intervals"] = named_intervals(bootstrap.classification_intervals(y, trivial, groups, k))
    res["cheap_baselines"] = {}
    for name, c in cheap.items():
        iv = bootstrap.classification_intervals(y, c["pred"], groups, k)
        res["cheap_baselines"][name] = {
            "description": describe_baseline(name, c.get("analysis_size")), "accuracy": iv["acc"].value,
            "balanced_accuracy": iv["bal_acc"].value, "macro_f1": iv["f1"].value,
            "intervals": named_intervals(iv), "prior_strength": c["prior_strength"],
            "cv_balanced_accuracy": c["cv_balanced_accuracy"], "analysis_size": c.get("analysis_size"),
        }
    if not cheap:
        res["findings"] = finding_rates(y, pred, None, groups)
        return res
    best = max(cheap, key=lambda n: cheap[n]["cv_balanced_accuracy"])
    res["findings"] = finding_rates(y, pred, cheap[best]["pred"], groups)
    diff = bootstrap.paired_difference(y, pred, cheap[best]["pred"], groups, k)
    calls = {m: bootstrap.verdict(diff[m]) for m in ("bal_acc", "f1")}
    outcome = "loses" if "loses" in calls.values() else "beats" if set(calls.values()) == {"beats"} else "tied"
    res["versus_baseline"] = {
        "baseline": best, "description": describe_baseline(best, cheap[best].get("analysis_size")),
        "chosen_by": "the best cross-validated balanced accuracy on the pool (the trial's folds)",
        "difference": named_intervals(diff), "outcome": outcome,
        "level": bootstrap.LEVEL, "resamples": bootstrap.N_BOOT,
    }
    return res


def cheap_verdict(v: dict[str, Any]) -> str:
    """One sentence on the CNN against the best cheap baseline, with the paired intervals."""
    d = v["difference"]
    figs = (f"balanced accuracy {d['balanced_accuracy']['value']:+.3f} [{d['balanced_accuracy']['lo']:+.3f}, "
            f"{d['balanced_accuracy']['hi']:+.3f}], macro-F1 {d['macro_f1']['value']:+.3f} [{d['macro_f1']['lo']:+.3f}, "
            f"{d['macro_f1']['hi']:+.3f}] (CNN minus {v['description']}, {v['level']:.0%} package bootstrap)")
    if v["outcome"] == "beats":
        return f"beats the best cheap baseline: {figs}"
    if v["outcome"] == "loses":
        return (f"LOSES to the best cheap baseline: {figs}; do not use this CNN where the cheap model serves "
                "(README, \"Is the CNN worth it?\")")
    return (f"TIED with the best cheap baseline: {figs}; the CNN is not shown to be worth its cost "
            "(README, \"Is the CNN worth it?\")")


def evaluate_holdout(
    cfg: TrialConfig, ev: EvaluateConfig, model: FoldEnsemble, oof: tuple[np.ndarray, np.ndarray],
    ds: Dataset, holdout: HoldOut, out_dir: Path, *, decode_size: int, log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], Prediction]:
    """Predict the held-out packages with the final model, correct for class priors, write files into out_dir:
    evaluation.json, predictions.csv, plots, and the model bundle (out_dir/bundle) that `pqfn predict` runs.

    oof: the selected trial's out-of-fold (dataset rows, logits) on which the prior strength is chosen.
    """
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = driver_device(cfg.device)  # trial.device is where trials trained; a CPU-only head evaluates on CPU
    priors = np.asarray(ev.priors, np.float64) if ev.priors is not None else natural_priors(ds.labels[holdout.pool])
    oof_idx, oof_logits = oof
    chosen: dict[str, Any] = {}
    if ev.prior_strength == "auto":
        # bootstrap over packages (without package ids each image is its own package)
        strength, chosen = choose_strength(ds.labels[oof_idx], oof_logits, priors, ds.package_ids[oof_idx])
    else:
        strength = float(ev.prior_strength)
    raw = predict_rows(cfg, model, ds, holdout.test, device)
    pred = Prediction(holdout.test, raw, priors, strength)
    y = ds.labels[holdout.test]
    metrics = holdout_metrics(ds, holdout.test, pred.logits.argmax(1))
    raw_m = holdout_metrics(ds, holdout.test, raw.argmax(1))
    metrics["raw"] = {k: raw_m[k] for k in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall",
                                             "macro_f1", "confusion_matrix")}
    metrics["baselines"] = baselines(priors, y)
    entries = build_pool(ds, holdout.pool, cfg.data_size, cfg.max_copies, cfg.seed)  # the trial's pool, as it trained
    cheap = cheap_baselines(cfg, ev, ds, holdout, entries, priors)
    metrics |= compare_with_baselines(y, pred.logits.argmax(1), ds.package_ids[holdout.test], cheap,
                                      int(np.argmax(priors)))
    metrics["prior_correction"] = {
        "priors": dict(zip(CLASSES, priors.round(4).tolist(), strict=True)), "strength": strength,
        "chosen_by": ("auto: the weakest strength within one standard error (paired package bootstrap) of the best out-of-fold prior-weighted "
                      "macro-F1 whose out-of-fold accuracy beats the majority class") if ev.prior_strength == "auto"
        else "config",
    } | chosen
    metrics["final_model"] = f"ensemble of {len(model.members)} fold models"
    metrics["calibration"] = {
        "ece": expected_calibration_error(pred.probs, y), "ece_raw": expected_calibration_error(pred.raw_probs, y),
        "brier": brier_score(pred.probs, y), "brier_raw": brier_score(pred.raw_probs, y), "bins": 10,
    }
    plot_reliability(out_dir / "reliability.png", {"prior-corrected": pred.probs, "raw": pred.raw_probs}, y)
    loc = localisation(model, ds, holdout.test, entries, cfg.resolution, log, cfg.reduce)
    metrics["localisation"] = loc[0] if loc else None
    if loc:
        metrics["localisation_baselines"] = loc[1]
    metrics["verdict"] = verdict(metrics)
    if "versus_baseline" in metrics:
        metrics["verdict"] = cheap_verdict(metrics["versus_baseline"]) + "; " + metrics["verdict"]
    metrics["seconds"] = time.perf_counter() - t0
    write_evaluation(out_dir, metrics, ds, holdout.test, pred.probs, pred.raw_probs)
    write_bundle(out_dir / "bundle", cfg, model, priors=priors, prior_adjust=True, prior_strength=strength,
                 fingerprint=data_fingerprint(ds.subset(holdout.pool), masks=cfg.mask_loss > 0),
                 metrics=_bundle_metrics(metrics),
                 decode_size=decode_size, overwrite=True)
    return metrics, pred  # the verdict is printed once, by the caller's summary


def localisation(model: FoldEnsemble, ds: Dataset, rows: np.ndarray, train_rows: np.ndarray, resolution: int,
                 log: Callable[[str], None], reduce: str = "bilinear") -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Grad-CAM peaks against the true delamination masks, and the two localisation baselines beside them
    (synthetic data only; None without masks)."""
    try:
        return localisation_report(model, ds, rows, train_rows, resolution, reduce=reduce)
    except DataError as e:
        log(f"held-out: no localisation score ({e})")
        return None


def _bundle_metrics(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("n_test_images", "n_test_packages", "accuracy", "balanced_accuracy", "macro_precision", "macro_recall",
            "macro_f1", "per_class", "raw", "baselines", "intervals", "cheap_baselines", "versus_baseline",
            "findings", "calibration", "localisation", "localisation_baselines", "verdict")
    return {k: m[k] for k in keys if k in m}


def evaluate_selection(cfg: Config, sdir: Path, selection: Selection, ds: Dataset, holdout: HoldOut, *,
                       log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The sweep's step 6: the selected trial's fold ensemble on the held-out packages, into <sweep>/final.

    Resumable: an evaluation of the same trial already in final/ is reused, not recomputed.
    """
    if selection.selected is None or not cfg.evaluate.enabled:
        return None
    final = sdir / "final"
    done = final / "evaluation.json"
    trial_id, params = selection.selected["trial_id"], selection.selected["params"]
    if done.exists():
        previous = json.loads(done.read_text())
        if previous.get("trial_id") == trial_id:
            return previous  # type: ignore[no-any-return]
    tc = with_overrides(cfg, params).trial
    folder = sdir / "trials" / trial_id
    model = load_members(folder, tc.model)
    metrics, _ = evaluate_holdout(tc, cfg.evaluate, model, load_oof(folder), ds, holdout, final,
                                  decode_size=cfg.data.decode_size, log=log)
    metrics |= {"trial_id": trial_id, "params": params}
    atomic_write(done, json.dumps(metrics, indent=2))
    return metrics
