"""OptunaSearch that tells the Optuna study the truth.

Measured on Ray 2.60 with Optuna 5.0, the stock OptunaSearch records a trial as COMPLETE with its
last reported value whenever one exists: a trial stopped early by ASHA (whose early-epoch gap is
small only because nothing has overfit yet) and a trial that raised after some epochs both look
like finished trials to the sampler. Here:

- a trial that did not reach its full epoch budget is told PRUNED (its per-epoch values stay
  in the study as intermediate values); one that raised is told FAIL;
- intermediate values are keyed by epoch, not by Tune's report count (a trial reports only every
  trial.eval_every epochs, and the count restarts differently after a restore);
- on restore after a crash, study trials left RUNNING that the restored searcher does not know
  (handed out after its last snapshot, then orphaned) are marked FAIL; a trial the study saw
  finish after that snapshot is re-run by Tune from its checkpoint and keeps its first record.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import optuna
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import flatten_dict

log = logging.getLogger(__name__)


def fail_orphans(study: optuna.Study, known_ids: set[int]) -> list[int]:
    """Mark RUNNING study trials whose storage id is not in known_ids as FAIL; returns their numbers."""
    storage = study._storage
    orphans = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t._trial_id not in known_ids:
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            orphans.append(t.number)
    return orphans


class ShuffledGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler (every grid point once, in seeded random order) without its study.stop() when the
    grid is done: Tune drives the trials (num_samples), not study.optimize, and outside optimize stop() raises
    "`Study.stop` is supposed to be invoked inside an objective function", which Tune printed as a warning
    after the last trial. The trial's state is stored either way (Optuna stores it after after_trial)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


class HonestOptunaSearch(OptunaSearch):
    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        # The trainable takes every search type's parameters in one shape: {"overrides": {dotted key: value}}
        # (grid points arrive that way from Tune's grid_search). The study keeps the plain dotted names.
        config = super().suggest(trial_id)
        return {"overrides": flatten_dict(config, delimiter="/")} if isinstance(config, dict) and config else config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        # Resumed after a crash: the study recorded this trial's end after the searcher's last
        # snapshot, so Tune re-runs it from its checkpoint; the study keeps its first record.
        if "epoch" in result:  # the stock searcher reports at step = training_iteration
            result = result | {TRAINING_ITERATION: int(result["epoch"])}
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        full = bool(result) and result.get("epoch", 0) >= result.get("epochs", math.inf)  # type: ignore[union-attr]
        if trial_id in self._completed_trials or (full and not error):
            super().on_trial_complete(trial_id, result, error)
            return
        state = optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
        study: Any = self._ot_study
        try:
            study.tell(self._ot_trials[trial_id], None, state=state)
        except Exception as exc:  # noqa: BLE001 - e.g. already finished in the study before a restore
            log.warning("optuna: could not record trial %s as %s: %s", trial_id, state.name, exc)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {t._trial_id for t in self._ot_trials.values()}
        study: Any = self._ot_study
        orphans = fail_orphans(study, known)
        if orphans:
            log.warning("optuna: marked trial(s) %s FAIL: left RUNNING by an interrupted sweep", orphans)
