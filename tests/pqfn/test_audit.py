"""The hindsight audit's figures as a strict JSON reader gets them: undefined is null with a reason, never NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pqfn.audit import _spearman, lines, write_audit
from pqfn.io import strict_json


def _strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_a_rank_correlation_of_two_trials_is_undefined_and_says_why() -> None:
    assert _spearman([0.9, 0.8], [0.7, 0.9]) == (None, "undefined: 2 trial(s) ranked, a rank correlation needs at least 3")
    rho, why = _spearman([0.9, 0.8, 0.7], [0.7, 0.9, 0.6])
    assert rho == pytest.approx(0.5) and why == ""
    assert _spearman([0.9, 0.9, 0.9], [0.7, 0.9, 0.6])[0] is None  # a constant ranking ranks nothing


def test_strict_json_writes_null_for_undefined_numbers() -> None:
    text = strict_json({"a": math.nan, "b": [np.float64("inf"), np.float32(0.5), 1], "c": {"d": -math.inf}, "e": "NaN"})
    assert _strict(text) == {"a": None, "b": [None, 0.5, 1], "c": {"d": None}, "e": "NaN"}


def test_audit_json_of_a_two_trial_sweep_is_strict_and_its_lines_say_undefined(tmp_path: Path) -> None:
    rho, why = _spearman([0.93, 0.94], [0.91, 0.93])
    iv = {"value": 0.9, "lo": math.nan, "hi": math.nan}  # a held-out set too small for an interval
    audit = {"label": "HINDSIGHT: x", "metric": "val/bal_acc", "held_out_metric": "bal_acc", "selected": "t1",
             "n_ranked": 2, "spearman": rho, "spearman_note": why,
             "trials": [{"trial_id": "t1", "params": {"trial.data_size": 480}, "cv val/bal_acc": 0.94,
                         "held_out": {"bal_acc": iv}}]}
    written = _strict(write_audit(tmp_path, audit).read_text())
    assert written["spearman"] is None and written["trials"][0]["held_out"]["bal_acc"]["lo"] is None  # type: ignore[index]
    text = "\n".join(lines(written))  # type: ignore[arg-type]
    assert "Spearman (cv ranking vs held-out ranking, 2 trials): undefined: 2 trial(s) ranked" in text
    assert "held-out bal_acc 0.900 [n/a, n/a]" in text and "nan" not in text.lower()
