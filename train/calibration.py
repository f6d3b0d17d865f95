"""The odds correction behind `p_calibrated`: sample weighting's inflation of the predicted odds,
measured on the validation split and divided out.

A row weighted w trains as if it were repeated w times, so a positive weighted w̄ on average (and
negatives weighted 1) leaves the model predicting odds w̄ times the true odds. The correction

    p_calibrated = p / (p + (1 − p) · c)        (odds / c; logit − log c)

is that model, inverted: one factor c, fitted by maximum likelihood on the validation split
(logistic regression on the logit with its slope fixed at 1). Why not Platt scaling (a slope
too): the slope is not part of the inflation, one parameter cannot overfit a small validation
split, and a shift is strictly increasing for any fitted c — AUC, GAUC and every ranking metric
are unchanged by construction, where a fitted slope near 0 or below would flatten or flip the
ranking. The maximum-likelihood c makes the calibrated probabilities sum to the number of
positives on the split it was fitted on (calibration exactly 1 there).

Where weights vary with the features (watch time), the inflation varies per row and one factor
corrects the average, not every row: calibration by buckets of p stays imperfect, the mean is
right.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

_EPS = 1e-7
"""Probabilities are clamped to [ε, 1 − ε] before the logit (float32 sigmoids saturate)."""


@dataclass(frozen=True)
class OddsCorrection:
    """`p / (p + (1 − p) · odds_factor)` for the probability of `label`."""

    label: str
    odds_factor: float
    """How many times the model's odds exceed the observed ones (>1: inflated)."""
    rows: int
    """Validation rows it was fitted on."""
    step: int = -1
    """The training step of the weights it was fitted for (-1: unknown)."""

    @classmethod
    def fit(
        cls, probs: Tensor, target: Tensor, label: str, step: int = -1
    ) -> OddsCorrection | None:
        """The maximum-likelihood factor for `probs` against `target > 0`; None where it does not
        exist (no row, no positive, or no negative: the odds are 0 or infinite)."""
        positives = float((target > 0).sum())
        rows = probs.numel()
        if rows == 0 or positives in (0.0, float(rows)):
            return None
        logits = torch.logit(probs.to(torch.float64).clamp(_EPS, 1 - _EPS))
        shift = _solve_shift(logits, positives)
        return cls(label=label, odds_factor=math.exp(-shift), rows=rows, step=step)

    @property
    def log_factor(self) -> float:
        return math.log(self.odds_factor)

    def apply(self, probs: Tensor) -> Tensor:
        """Calibrated probabilities (float64 in, float64 out; for metrics)."""
        logits = torch.logit(probs.to(torch.float64).clamp(_EPS, 1 - _EPS))
        return torch.sigmoid(logits - self.log_factor)

    def apply_to_logits(self, logits: Tensor) -> Tensor:
        """Calibrated probabilities from the model's logits (what the scorer and export run)."""
        return torch.sigmoid(logits.float() - self.log_factor)

    def to_state(self) -> dict[str, Any]:
        """Plain types, for the checkpoint and `feature_spec.json`."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> OddsCorrection:
        factor = float(state["odds_factor"])
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"odds_factor must be a finite number > 0, got {factor!r}")
        return cls(str(state["label"]), factor, int(state["rows"]), int(state.get("step", -1)))


def _solve_shift(logits: Tensor, positives: float) -> float:
    """The b with Σ σ(logit + b) = positives: Newton steps kept inside a bisection bracket (the
    sum increases strictly in b, so the root is unique)."""
    low, high = -60.0, 60.0
    b = math.log(positives) - math.log(logits.numel() - positives) - float(logits.mean())
    b = min(max(b, low), high)
    for _ in range(100):
        p = torch.sigmoid(logits + b)
        excess = float(p.sum()) - positives
        if excess > 0:
            high = b
        else:
            low = b
        slope = float((p * (1 - p)).sum())
        step = excess / slope if slope > 0 else math.inf
        b_next = b - step
        if not low < b_next < high:
            b_next = (low + high) / 2
        if abs(b_next - b) < 1e-12:
            return b_next
        b = b_next
    return b
