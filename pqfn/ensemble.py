"""The final model: the selected trial's K fold models as one ensemble, and the class-prior correction.

Why an ensemble and not a retrained model: on the quickstart's held-out packages the fold ensemble
measured better than one model retrained on the whole pool, and it costs nothing after the search
(README, "The final model", has the figures).

Why a prior correction: every model trains on a class-balanced pool (equal priors), but real scans
come at their natural frequencies (most packages are pristine, D). Bayes' rule moves the balanced
model's posterior to the natural one by adding log(prior) to its logits (logit adjustment); a
strength between 0 (raw) and 1 (full correction) is chosen on out-of-fold predictions, the weakest
one that is as good as the best within its noise (choose_strength).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.metrics import f1_score
from torch import nn

from pqfn.bootstrap import metric_draws
from pqfn.config import CLASSES
from pqfn.errors import TrialError
from pqfn.io import read_npz, read_safetensors
from pqfn.model import build_model

MODELS_FILE = "models.safetensors"
OOF_FILE = "oof.npz"
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class FoldEnsemble(nn.Module):
    """Averages the members' class probabilities; forward returns log(mean probability), so it reads as
    logits everywhere (softmax of the output = the mean of the members' softmax)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, r, r) -> (B, classes)
        p = torch.stack([m(x).float().softmax(-1) for m in self.members]).mean(0)
        return p.clamp_min(1e-12).log()


def save_members(folder: Path, members: list[nn.Module], oof_index: np.ndarray, oof_logits: np.ndarray) -> None:
    """Fold models (one file, keys member{k}.*) and their out-of-fold logits, written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {f"member{k}.{name}": t.detach().contiguous().cpu() for k, m in enumerate(members) for name, t in m.state_dict().items()}
    tmp = folder / (MODELS_FILE + ".tmp")
    save_file(sd, str(tmp), metadata={"members": str(len(members))})
    tmp.replace(folder / MODELS_FILE)
    tmp_oof = folder / "oof.tmp.npz"
    np.savez(tmp_oof, index=oof_index, logits=oof_logits)
    tmp_oof.replace(folder / OOF_FILE)


FOLD_FILES_HINT = (f"`pqfn trial` and a sweep trial (trials/<id>/) write {MODELS_FILE} and {OOF_FILE} into their "
                   "results folder, which --model takes")


def check_fold_folder(folder: Path, key: str = "--model") -> None:
    """A fold-model folder, named by `key`: a file or a missing path is one line naming it."""
    if folder.is_file():
        raise TrialError(f"{key} {folder}: is a file; expected the folder that holds it ({FOLD_FILES_HINT})")
    if not folder.is_dir():
        raise TrialError(f"{key} {folder}: no such folder; expected a folder of fold models ({FOLD_FILES_HINT})")


def load_members(folder: Path, model_name: str) -> FoldEnsemble:
    """The fold models of a trial folder, read through the guarded reader (damaged or foreign: one line)."""
    path = folder / MODELS_FILE
    sd = read_safetensors(path, "the trial's fold models", TrialError, FOLD_FILES_HINT)
    try:
        n = 1 + max((int(k.split(".", 1)[0].removeprefix("member")) for k in sd), default=-1)
    except ValueError:
        n = 0
    if n == 0:
        raise TrialError(f"{path}: holds no member<k>.* fold-model weights; {FOLD_FILES_HINT}")
    members = []
    for k in range(n):
        m = build_model(model_name)
        prefix = f"member{k}."
        try:
            m.load_state_dict({key[len(prefix):]: v for key, v in sd.items() if key.startswith(prefix)})
        except RuntimeError as e:
            raise TrialError(f"{path}: member {k} does not fit {model_name} ({str(e).splitlines()[0]})") from None
        members.append(m)
    return FoldEnsemble(members).eval()


def load_oof(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The out-of-fold (dataset rows, logits) saved beside the fold models; a missing or damaged file: one line."""
    path = folder / OOF_FILE
    z = read_npz(path, ("index", "logits"), "the out-of-fold predictions", TrialError, FOLD_FILES_HINT)
    index, logits = z["index"], z["logits"]
    if (index.ndim != 1 or not np.issubdtype(index.dtype, np.integer) or logits.ndim != 2
            or logits.shape != (len(index), len(CLASSES)) or not np.isfinite(logits).all()):
        raise TrialError(f"{path}: index {index.shape} {index.dtype} and logits {logits.shape} are not out-of-fold "
                         f"predictions (expected N integer rows and finite (N, {len(CLASSES)}) logits); {FOLD_FILES_HINT}")
    return index, logits


def check_oof_fits(folder: Path, index: np.ndarray, n_rows: int, pool: np.ndarray) -> None:
    """The out-of-fold rows must be rows of this data set's search pool: an oof.npz of another data set (or
    of another split) would pair logits with the wrong labels."""
    path = folder / OOF_FILE
    if len(index) and (index.min() < 0 or index.max() >= n_rows):
        raise TrialError(f"{path}: names data set row {int(index.max() if index.max() >= n_rows else index.min())} "
                         f"but this data set has {n_rows} images: it was written for another data set; "
                         "evaluate it with the config that trained it")
    outside = np.setdiff1d(index, pool)
    if len(outside) or len(np.unique(index)) != len(index):
        raise TrialError(f"{path}: {len(outside)} of its {len(index)} rows are not in this data set's search pool "
                         "(held-out rows or repeats): it was written for another data set or split; evaluate it "
                         "with the config that trained it")


def natural_priors(labels: np.ndarray) -> np.ndarray:
    """Class frequencies of a set of original images (every class at least 1 count, so log() is finite)."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    return (counts + 1) / (counts.sum() + len(CLASSES))


def adjust(logits: np.ndarray, priors: np.ndarray, strength: float) -> np.ndarray:
    """Logit adjustment: logits + strength * log(priors). strength 1 turns equal-prior posteriors into
    posteriors under `priors` (Bayes' rule); 0 leaves them as trained."""
    return logits + strength * np.log(priors)[None, :]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _weighted_macro_f1(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> float:
    return float(f1_score(y, pred, labels=list(range(len(CLASSES))), average="macro", sample_weight=w, zero_division=0))


def choose_strength(y: np.ndarray, logits: np.ndarray, priors: np.ndarray, groups: np.ndarray | None = None,
                    *, n_boot: int = 1000, seed: int = 0) -> tuple[float, dict[str, object]]:
    """The prior-correction strength for the natural class mix, chosen on (balanced) out-of-fold predictions.

    Each image weighs prior[class] / pool share[class], so a score is what the natural mix would give.
    The rule, the same parsimony as the configuration selection: the WEAKEST strength whose weighted
    macro-F1 is within one standard error of the best strength's and whose weighted accuracy beats
    answering the majority class every time. The standard error is that of the PAIRED difference
    (strength minus best, both scored on the same bootstrap resamples of packages, `groups`; of images
    without them): the two strengths score the same scans, so what they share cancels (the best
    strength's own bootstrap error, used until issue 20, was about 1.4x as wide in a toy case and let
    strengths through that lose on every resample). Why the weakest: a stronger correction buys accuracy
    with the recall of the rare classes (strength 0 is what balanced accuracy favours, 1 what accuracy
    favours). When no strength qualifies, the best-scoring one. Returns (strength, details for evaluation.json).
    """
    share = np.bincount(y, minlength=len(CLASSES)) / len(y)
    w = priors[y] / np.maximum(share[y], 1e-12)
    preds = {s: adjust(logits, priors, s).argmax(1) for s in STRENGTHS}
    f1 = {s: _weighted_macro_f1(y, p, w) for s, p in preds.items()}
    acc = {s: float(np.average(p == y, weights=w)) for s, p in preds.items()}
    best = min(s for s in STRENGTHS if f1[s] >= max(f1.values()) - 1e-9)
    # Bootstrap over packages (all scans of a package together, as the folds were drawn), paired across strengths.
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    draws = metric_draws(y, [preds[s] for s in STRENGTHS], groups, len(CLASSES), weights=w, n_boot=n_boot, seed=seed)
    boot = {s: np.nan_to_num(d["f1"]) for s, d in zip(STRENGTHS, draws, strict=True)}  # NaN only if no class is scored at all
    se = {s: float(np.std(boot[s] - boot[best])) for s in STRENGTHS}
    majority = float(priors.max() / priors.sum())
    ok = [s for s in STRENGTHS if f1[best] - f1[s] <= se[s] and acc[s] > majority]
    strength = min(ok) if ok else best
    return strength, {
        "best_strength": best, "se": round(se[strength], 4), "majority_rate": round(majority, 4),
        "se_of_difference_to_best": {str(s): round(v, 4) for s, v in se.items()},
        "oof_macro_f1_by_strength": {str(s): round(v, 4) for s, v in f1.items()},
        "oof_accuracy_by_strength": {str(s): round(v, 4) for s, v in acc.items()},
    }
