"""Prior correction and the fold ensemble, on hand-made numbers where theory gives the answer."""

from __future__ import annotations

import numpy as np
import torch

from pqfn.ensemble import FoldEnsemble, adjust, choose_strength, natural_priors, softmax


def test_full_prior_correction_is_bayes_rule() -> None:
    # A balanced-pool model says p(x|c) ~ [0.4, 0.1, 0.1, 0.4] for one scan (equal priors): A and D tie.
    logits = np.log(np.array([[0.4, 0.1, 0.1, 0.4]]))
    priors = np.array([0.2, 0.1, 0.1, 0.6])
    p = softmax(adjust(logits, priors, 1.0))[0]
    expected = np.array([0.4 * 0.2, 0.1 * 0.1, 0.1 * 0.1, 0.4 * 0.6])
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-12)
    assert p.argmax() == 3  # the frequent class wins the tie
    np.testing.assert_allclose(softmax(adjust(logits, priors, 0.0)), softmax(logits))  # strength 0 = raw
    # Half strength multiplies by sqrt(prior): between the two.
    half = softmax(adjust(logits, priors, 0.5))[0]
    assert p[3] > half[3] > softmax(logits)[0, 3]


def test_uniform_priors_change_nothing() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 4))
    np.testing.assert_array_equal(adjust(logits, np.full(4, 0.25), 1.0).argmax(1), logits.argmax(1))


def test_natural_priors_are_smoothed_frequencies() -> None:
    p = natural_priors(np.array([0, 3, 3, 3]))
    np.testing.assert_allclose(p, np.array([2, 1, 1, 4]) / 8)


def test_strength_chosen_on_out_of_fold_predictions() -> None:
    # Balanced out-of-fold set where the model confuses D with B half the time; natural priors are mostly D.
    y = np.repeat(np.arange(4), 50)
    logits = np.full((200, 4), -3.0)
    logits[np.arange(200), y] = 0.0
    d = np.flatnonzero(y == 3)[:25]
    logits[d, 1] = 0.3  # these D scans look a little more like B
    priors = np.array([0.15, 0.05, 0.05, 0.75])
    s, scores = choose_strength(y, logits, priors)
    assert s > 0 and scores[s] > scores[0.0]  # correcting toward D fixes the weighted F1
    # When the model is already right everywhere, no correction is the smallest best strength.
    clean = np.full((200, 4), -3.0)
    clean[np.arange(200), y] = 0.0
    assert choose_strength(y, clean, priors)[0] == 0.0


def test_ensemble_averages_member_probabilities() -> None:
    class Fixed(torch.nn.Module):
        def __init__(self, p: list[float]):
            super().__init__()
            self.logits = torch.log(torch.tensor(p))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits.expand(len(x), -1)

    ens = FoldEnsemble([Fixed([0.7, 0.1, 0.1, 0.1]), Fixed([0.1, 0.1, 0.1, 0.7])])
    out = ens(torch.zeros(3, 1, 8, 8)).softmax(-1)
    torch.testing.assert_close(out, torch.tensor([[0.4, 0.1, 0.1, 0.4]]).expand(3, -1))
