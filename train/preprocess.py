"""Dense preprocessing, the one step that travels with the model: NaN filled, then standardised
with the training statistics. Training (`RankingModule`), prediction and export (`Scorer`) run
this same module, so a served score is the trained function (tests/test_preprocess.py pins it).

Ids are hashed outside the model, by `train.data.features.model_inputs`, again one function for
training and prediction; the exported artifact documents it for serving systems.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

DENSE_FILLS = ("mean", "zero")
LEGACY_STATE_KEYS = {"dense_mean": "preprocess.mean", "dense_std": "preprocess.std"}
"""Where checkpoints written before this module (format 1 as well) keep the statistics."""
"""How NaN (missing) dense values are filled: the training mean, or 0."""


class DensePreprocess(nn.Module):
    """Raw dense features [rows, D] (NaN = missing) -> filled and standardised."""

    def __init__(
        self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor, fill: str = "mean"
    ) -> None:
        super().__init__()
        if fill not in DENSE_FILLS:
            raise ValueError(f"data.dense_fill must be one of {DENSE_FILLS}, got {fill!r}")
        mean = torch.as_tensor(mean, dtype=torch.float32).detach().clone()
        std = torch.as_tensor(std, dtype=torch.float32).detach().clone()
        if mean.shape != std.shape or mean.dim() != 1:
            raise ValueError(f"dense mean {list(mean.shape)} and std {list(std.shape)} differ")
        self.fill = fill
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, dense: Tensor) -> Tensor:
        if self.fill == "mean":
            # A NaN filled with the mean standardises to 0: the same values as filling first,
            # in one op fewer (infinities stay infinite).
            standard = (dense - self.mean) / self.std
            return standard.nan_to_num_(nan=0.0, posinf=torch.inf, neginf=-torch.inf)
        return (torch.nan_to_num(dense, nan=0.0) - self.mean) / self.std
