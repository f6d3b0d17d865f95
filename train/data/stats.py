"""Statistics of the training split, computed once and kept with the model: dense means and
standard deviations (for standardising), which behaviours are binary, positive rates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from train.data.batch import Batch


@dataclass
class TrainStats:
    rows: int
    dense_mean: list[float]
    dense_std: list[float]
    continuous: list[str]
    """Behaviours with values other than 0/1 (watch time); the others are binary."""
    positive_rate: dict[str, float]
    """Share of training rows with behaviour > 0."""
    behaviour_mean: dict[str, float]

    @staticmethod
    def of(table: Batch, behaviour_names: Sequence[str]) -> TrainStats:
        dense = table.dense.double()
        present = ~torch.isnan(dense)
        count = present.sum(0).clamp_min(1)
        mean = torch.where(present, dense, 0).sum(0) / count
        var = (torch.where(present, dense - mean, 0) ** 2).sum(0) / count
        # Constant or all-missing columns get std 1 so standardising never divides by ~0.
        std = torch.where(var.sqrt() > 1e-12, var.sqrt(), torch.ones_like(var))
        behaviours = table.behaviours.double()
        is_binary = ((behaviours == 0) | (behaviours == 1)).all(0)
        return TrainStats(
            rows=len(table),
            dense_mean=mean.tolist(),
            dense_std=std.tolist(),
            continuous=[
                n for n, b in zip(behaviour_names, is_binary.tolist(), strict=True) if not b
            ],
            positive_rate={
                n: float(v)
                for n, v in zip(behaviour_names, (behaviours > 0).double().mean(0), strict=True)
            },
            behaviour_mean={
                n: float(v) for n, v in zip(behaviour_names, behaviours.mean(0), strict=True)
            },
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)
