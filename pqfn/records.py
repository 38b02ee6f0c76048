"""Typed records passed between the stages of a sweep: one trial's outcome, the selection.

Statuses and the metric names a row carries are defined here once; the sweep (tune_jobs/),
the selection, the report, `pqfn report` and W&B all read and write these records.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["completed", "stopped", "failed"]
COMPLETED: Status = "completed"  # ran its full epoch budget: the only status the selection considers
STOPPED: Status = "stopped"  # stopped early by the scheduler (ASHA): its small early gap means nothing
FAILED: Status = "failed"
STATUSES: tuple[Status, ...] = (COMPLETED, STOPPED, FAILED)


def overlap_factor(n: int, repeats: int = 1) -> float:
    """Variance of the mean of n fold scores = fold variance * this (Nadeau and Bengio 2003; for repeated
    cross-validation, Bouckaert and Frank 2004): 1/n + n_val/n_train, with n_val/n_train = 1/(k-1) for k equal
    folds per repeat (k = n / repeats). The folds' training sets overlap, so their scores are correlated and
    s^2/n (the naive 1/n) is too small: by 2.5x at 3 folds, 2.25x at 5. Repeats shrink only the 1/n part:
    3 folds x 2 repeats gives 0.67 where 3 folds give 0.83 (SE 0.90x), x 5 repeats 0.57 (SE 0.83x)."""
    k = n / max(repeats, 1)
    return 1.0 / n + 1.0 / (k - 1)


def is_complete(metrics: dict[str, Any]) -> bool:
    """A trial's last record reached its epoch budget."""
    return float(metrics.get("epoch", 0)) >= float(metrics.get("epochs", math.inf))


@dataclass
class TrialOutcome:
    """One trial as the selection and the reports see it: its parameters and final fold-mean metrics."""

    trial_id: str
    status: Status
    params: dict[str, Any]  # the searched keys, dotted (trial.resolution: 48)
    metrics: dict[str, float] = field(default_factory=dict)  # final record in the pqfn.metrics vocabulary
    epoch: int = 0
    time_total_s: float = 0.0
    node_ip: str = ""
    node_id: str = ""
    restored_from: float = 0.0
    error: str = ""

    def get(self, key: str) -> float:
        """A metric, NaN when the trial never reported it (failed before its first epoch)."""
        v = self.metrics.get(key, math.nan)
        return float(v) if isinstance(v, (int, float)) else math.nan

    def se(self, key: str) -> float:
        """Standard error of a fold-mean metric, corrected for overlapping training sets (Nadeau-Bengio):
        fold std * sqrt(1/n + 1/(k-1)) for n fold scores, k folds per repeat; NaN without at least 2 folds
        per repeat or a std."""
        n, r = self.get("n_folds"), self.repeats()
        return self.get(f"{key}_std") * math.sqrt(overlap_factor(int(n), r)) if n >= 2 * r else math.nan

    def repeats(self) -> int:
        """trial.repeats of the trial's record (1 when not recorded: a record from before repeats existed)."""
        r = self.get("n_repeats")
        return int(r) if math.isfinite(r) and r >= 1 else 1

    def brief(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "params": self.params}


@dataclass
class Selection:
    """What the selection decided and why (written as selection.json)."""

    rule: dict[str, Any]
    counts: dict[str, int]
    selected: dict[str, Any] | None = None  # trial_id, params, the deciding metrics and their standard errors
    reason: str = ""
    tied: list[dict[str, Any]] = field(default_factory=list)  # statistically tied with the winner
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every completed trial and its verdict
    pareto_front: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # the completed trial with the best selection metric

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selection:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class SweepResult:
    """What a sweep hands back (and prints): where, what was selected, how it did on held-out packages, time."""

    folder: str
    selection: Selection
    evaluation: dict[str, Any] | None = None  # final/evaluation.json; None when disabled or nothing selected
    timing: dict[str, Any] = field(default_factory=dict)  # phases, summed trial time, slots, search efficiency
    audit: dict[str, Any] | None = None  # audit.json: hindsight, never used to select; None when disabled


@dataclass
class TrialProgress:
    """Where a running trial is inside its epoch (CrossValidation.progress). Tune hears from a trial only at
    its measured epochs (trial.eval_every); the console reads this in between."""

    epoch: int  # the epoch in progress, 1-based (epochs done + 1; `epochs` once the last is done)
    epochs: int
    step: int  # batches done in this epoch, all folds together (a step: one batch of one fold model)
    steps: int  # batches per epoch, all folds together
    epoch_s: float | None = None  # the last whole epoch's seconds (training, and measuring when it measured)
    run_s: float = 0.0  # seconds since this process's first epoch began (0 before it)
    run_epochs: float = 0.0  # epochs done since then, fractional (a restored trial counts from its checkpoint)
    last_step_s: float = 0.0  # seconds from then to the latest batch (the time run_epochs took)
    cycle_s: float = 0.0  # seconds from the first epoch's start to the latest epoch's start
    cycle_epochs: int = 0  # whole epochs in cycle_s (training, measuring, reporting, checkpointing)

    def seconds_per_epoch(self) -> float | None:
        """Its own rate: over its whole epochs once one is done (what an epoch costs with its measuring and
        reporting), before that over the batches of the first; None until a tenth of an epoch is done."""
        if self.cycle_epochs >= 1:
            return self.cycle_s / self.cycle_epochs
        return self.last_step_s / self.run_epochs if self.run_epochs >= 0.1 else None
