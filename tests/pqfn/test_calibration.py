"""Calibration figures against hand-computed examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pqfn.calibration import brier_score, expected_calibration_error, plot_reliability, reliability_table


def test_ece_of_a_hand_made_example() -> None:
    # Two predictions at confidence 0.9 (one right: accuracy 0.5) and two at 0.6 (both right: accuracy 1):
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.6| = 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probs, y) == pytest.approx(0.4)
    table = reliability_table(probs, y)
    assert [r["n"] for r in table] == [0, 0, 0, 0, 0, 2, 0, 0, 2, 0]  # 0.6 in (0.5, 0.6], 0.9 in (0.8, 0.9]
    assert table[8]["accuracy"] == 0.5 and table[8]["confidence"] == pytest.approx(0.9)
    # Brier: (0.01 + 0.01), (0.81 + 0.81), (0.16 + 0.16), (0.16 + 0.16) -> mean 0.57
    assert brier_score(probs, y) == pytest.approx(0.57)


def test_ece_is_zero_when_confidence_matches_accuracy_and_bins_are_right_closed() -> None:
    # Confidence 0.75, right 3 times of 4; confidence exactly 1.0 goes to the last bin, 0.75 to (0.7, 0.8].
    probs = np.array([[0.75, 0.25]] * 4 + [[1.0, 0.0]] * 2)
    y = np.array([0, 0, 0, 1, 0, 0])
    assert expected_calibration_error(probs, y) == pytest.approx(0.0)
    assert [r["n"] for r in reliability_table(probs, y)][7:] == [4, 0, 2]


def test_reliability_diagram_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=50)
    y = rng.integers(0, 4, 50)
    plot_reliability(tmp_path / "r.png", {"raw": p, "prior-adjusted": p ** 2 / (p ** 2).sum(1, keepdims=True)}, y)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
