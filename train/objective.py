"""Training objectives: how a batch's behaviours become targets and loss weights, and what a
split's evaluation keeps besides the per-behaviour metrics.

An objective sees logits as [rows, outputs] and returns targets and weights of the same shape;
the loss is Σ over outputs of Σᵢ wᵢℓᵢ / Wₒ with Wₒ the global weight sum of that output (all
DDP ranks), so `RankingModule` runs one code path for every objective:

- `WeightedBCE`: sample loss weighting, one output, the weight scheme's weights;
- `train.heads.PerHeadBCE`: one output per behaviour, each on its own loss (or its own weight
  scheme's): `model=multihead`, `mmoe`, `ple`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from train.data.batch import Batch
from train.data.features import FeatureSpec
from train.data.stats import TrainStats
from train.metrics import ndcg_key
from train.weights import WeightScheme


@dataclass(frozen=True)
class Evaluation:
    """How validation and test are scored."""

    xauc_pairs: int = 1_000_000
    """XAUC is estimated on this many seeded random pairs per split."""
    seed: int = 0
    predictions: str | None = None
    """Where a multi-head run writes every head's test probabilities (a URL); None: nowhere."""
    ndcg_k: int = 10
    """NDCG@k per user (`metrics.ndcg_k`)."""
    ndcg_gain: WeightScheme | None = None
    """The scheme whose weights are NDCG's gains (`metrics.ndcg_gain`); None: label > 0."""

    def __post_init__(self) -> None:
        if (
            isinstance(self.xauc_pairs, bool)
            or not isinstance(self.xauc_pairs, int)
            or (self.xauc_pairs < 1)
        ):
            raise ValueError(f"xauc_pairs must be an integer >= 1, got {self.xauc_pairs!r}")
        if isinstance(self.ndcg_k, bool) or not isinstance(self.ndcg_k, int) or self.ndcg_k < 1:
            raise ValueError(f"ndcg_k must be an integer >= 1, got {self.ndcg_k!r}")

    def ndcg_key(self, label: str) -> str:
        """The `<behaviour>/<metric>` name NDCG is logged under with `label` (weights.label)."""
        return ndcg_key(label, self.ndcg_k, self.ndcg_gain)


class Objective(nn.Module):
    """The base: targets and weights per output, the ranking score, and (for objectives that
    keep more than the per-behaviour metrics) extra evaluation state per split."""

    def targets(self, behaviours: Tensor) -> tuple[Tensor, Tensor]:
        """(labels, weights), both [rows, outputs] float32."""
        raise NotImplementedError

    def score(self, probs: Tensor) -> Tensor:
        """The one score per row that the metrics rank by, from probabilities [rows, outputs]."""
        return probs.reshape(len(probs), -1)[:, 0]

    def label_probs(self, probs: Tensor) -> Tensor:
        """The probability of the scheme's label per row (what logloss, calibration and the odds
        correction measure): the score itself for one output."""
        return self.score(probs)

    def update(self, split: str, probs: Tensor, batch: Batch) -> None:
        """Keep what `finish` needs of one evaluation batch (nothing by default)."""

    def finish(self, split: str, save_to: str | None = None) -> dict[str, float]:
        """Extra metrics of the split (a collective under DDP: every rank calls it), and, with
        `save_to`, the split's predictions written there (rank 0 passes it)."""
        return {}


class WeightedBCE(Objective):
    """Sample loss weighting: one logit, label `behaviour > 0`, the scheme's weight per row.

    Weights scale by 1 / the mean training weight under `normalize: mean` (a single batch
    cannot know that mean; the statistics pass measured it)."""

    def __init__(self, scheme: WeightScheme, spec: FeatureSpec, stats: TrainStats) -> None:
        super().__init__()
        self.scheme = scheme
        self.behaviours = spec.behaviour_names
        self.label_column = self.behaviours.index(scheme.label)
        self.weight_scale = 1.0 / stats.weight_mean if scheme.normalize == "mean" else 1.0

    def targets(self, behaviours: Tensor) -> tuple[Tensor, Tensor]:
        weight = self.scheme.weights(behaviours, self.behaviours)
        if self.weight_scale != 1.0:
            weight = weight * self.weight_scale
        label = (behaviours[:, self.label_column] > 0).float()
        return label.unsqueeze(1), weight.unsqueeze(1)


def loss_sums(logits: Tensor, label: Tensor, weight: Tensor) -> Tensor:
    """Σᵢ wᵢℓᵢ per output [outputs], from logits, labels and weights [rows, outputs]."""
    losses = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.float(), label, reduction="none"
    )
    return (weight * losses).sum(0)


def weighted_bce(logits: Tensor, label: Tensor, weight: Tensor, weight_total: Tensor) -> Tensor:
    """Σ wᵢℓᵢ / W: with W the weight sum of the global batch this is the loss of the same batch
    with every row repeated wᵢ times (the duplication reading of sample weighting)."""
    rows = len(label)
    summed = loss_sums(logits.reshape(rows, -1), label.reshape(rows, -1), weight.reshape(rows, -1))
    return (summed / weight_total.clamp_min(torch.finfo(torch.float32).tiny)).sum()
