"""The one batch type that flows from every data source to the module."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """A batch of impressions, already featurised.

    Rows are impressions. Dense features are raw (NaN kept): the module standardises them with
    the training statistics it carries, so the same checkpoint scores raw data anywhere.
    """

    categorical: torch.Tensor
    """[rows, categorical features] int64 bucket ids, 0 reserved for nulls."""
    dense: torch.Tensor
    """[rows, dense features] float32, raw values, NaN where missing."""
    behaviours: torch.Tensor
    """[rows, behaviours] float32, in the order of `data.behaviours`."""
    group: torch.Tensor
    """[rows] int64, the GAUC group (hash of `data.group_key`)."""
    oracle: torch.Tensor | None = None
    """[rows, oracle behaviours] float32 true P(b) or E[b] (simulated data only)."""
    oracle_positive: torch.Tensor | None = None
    """[rows, oracle behaviours] float32 true P(b > 0)."""

    def __len__(self) -> int:
        return self.categorical.shape[0]

    def index(self, rows: torch.Tensor | slice) -> Batch:
        return Batch(**{f.name: _take(getattr(self, f.name), rows) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            **{
                f.name: None
                if (t := getattr(self, f.name)) is None
                else t.to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        def cat(name: str) -> torch.Tensor | None:
            parts = [getattr(b, name) for b in batches]
            return None if parts[0] is None else torch.cat(parts)

        return Batch(**{f.name: cat(f.name) for f in fields(Batch)})


def _take(tensor: torch.Tensor | None, rows: torch.Tensor | slice) -> torch.Tensor | None:
    if tensor is None:
        return None
    if isinstance(rows, slice):
        return tensor[rows]
    return tensor.index_select(0, rows)
