"""The odds correction behind p_calibrated (train/calibration.py): it undoes sample weighting's
inflation of the odds, and it never changes the ranking."""

from __future__ import annotations

import math

import pytest
import torch

from train.calibration import OddsCorrection
from train.checkpoint import CheckpointError, odds_correction
from train.metrics import auc, calibration


def _weighted_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Probabilities of a logistic regression on [1, x] fitted by weighted BCE (Σwℓ/Σw)."""
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        logits = theta[0] + theta[1] * x
        value = (
            w * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        ).sum() / w.sum()
        value.backward()
        return value

    optimizer.step(loss)
    return torch.sigmoid(theta[0].detach() + theta[1].detach() * x)


def test_a_model_trained_with_weighted_positives_is_corrected_back_to_the_true_rate() -> None:
    # Known inflation: every positive weighs 4, so the fitted odds are 4x the true ones.
    g = torch.Generator().manual_seed(0)
    n = 120_000
    x = torch.randn(n, generator=g, dtype=torch.float64)
    true_p = torch.sigmoid(-2.5 + 1.2 * x)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < true_p).double()
    p = _weighted_logistic_regression(x, y, torch.where(y > 0, 4.0, 1.0))
    val, test = slice(0, n // 2), slice(n // 2, n)
    assert calibration(p[test], y[test]) > 2.5  # the inflation is real

    correction = OddsCorrection.fit(p[val], y[val], "click")
    assert correction is not None and correction.rows == n // 2
    assert correction.odds_factor == pytest.approx(4.0, rel=0.05)
    corrected = correction.apply(p[test])
    assert float(calibration(corrected, y[test])) == pytest.approx(1.0, abs=0.02)
    assert float(corrected.mean()) == pytest.approx(float(true_p[test].mean()), rel=0.02)
    # A strictly increasing map: the ranking, hence the AUC, is the model's.
    assert float(auc(corrected, y[test])) == float(auc(p[test], y[test]))


def test_the_fit_matches_the_positives_of_its_split_exactly_even_at_the_extremes() -> None:
    g = torch.Generator().manual_seed(1)
    for logits, rate in (
        (torch.randn(5000, generator=g) * 8 - 12, 0.3),
        (torch.randn(50, generator=g), 0.02),
    ):
        probs = torch.sigmoid(logits)
        target = (torch.rand(len(probs), generator=g) < rate).double()
        target[0] = 1.0  # at least one positive and one negative
        target[1] = 0.0
        correction = OddsCorrection.fit(probs, target, "click")
        assert correction is not None
        # Σ p_calibrated = #positives (probabilities clamped to [1e-7, 1 - 1e-7] first)
        assert float(correction.apply(probs).sum()) == pytest.approx(float(target.sum()), rel=1e-9)
        torch.testing.assert_close(
            correction.apply_to_logits(torch.logit(probs.clamp(1e-7, 1 - 1e-7))).double(),
            correction.apply(probs),
            rtol=0,
            atol=1e-6,
        )


def test_no_correction_exists_without_both_classes() -> None:
    probs = torch.full((10,), 0.3)
    assert OddsCorrection.fit(probs, torch.zeros(10), "click") is None
    assert OddsCorrection.fit(probs, torch.ones(10), "click") is None
    assert OddsCorrection.fit(probs[:0], torch.zeros(0), "click") is None


def test_a_bad_saved_correction_is_refused_by_name() -> None:
    good = OddsCorrection("click", 2.5, 100, 7)
    assert odds_correction({"calibration": good.to_state()}, "ckpt=x") == good
    assert odds_correction({}, "ckpt=x") is None
    for bad in ({"label": "click", "odds_factor": -1.0, "rows": 3}, {"label": "click"}):
        with pytest.raises(CheckpointError, match=r"ckpt=x: upweight.calibration is not valid"):
            odds_correction({"calibration": bad}, "ckpt=x")
    assert math.isclose(OddsCorrection.from_state(good.to_state()).log_factor, math.log(2.5))
