"""The one batch type that flows from every data source to the module."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

POOLINGS = ("mean", "sum", "attention")
"""How a list column becomes one vector: the mean or sum of its elements' embeddings, or
target attention against the candidate's embedding from the same table (DIN-style)."""


Targets = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""An objective's `targets`: behaviours [rows, behaviours] -> (labels, weights), each
[rows, outputs] float32."""


@dataclass(frozen=True)
class SequenceInput:
    """What a network needs to know of one list column of `Batch.sequences`: the embedding
    table its elements index (a position in the network's `cardinalities`), how many slots it
    takes, and how it is pooled. `candidate`: for attention, the categorical column (its index
    in `Batch.categorical`) whose embedding the elements attend to; None otherwise.
    `own_table`: the table is the list's own (after the categorical columns' tables), not a
    categorical column's."""

    table: int
    max_len: int
    pooling: str = "mean"
    candidate: int | None = None
    own_table: bool = False


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
    group: torch.Tensor | None = None
    """[rows] int64, the GAUC group (hash of `data.group_key`); None in training batches."""
    oracle: torch.Tensor | None = None
    """[rows, oracle behaviours] float32 true P(b) or E[b] (simulated data only)."""
    oracle_positive: torch.Tensor | None = None
    """[rows, oracle behaviours] float32 true P(b > 0)."""
    sequences: torch.Tensor | None = None
    """[rows, Σ max_len] int64: every list column's last `max_len` elements as indices into its
    table, in list order, padded with 0 (0 is also a null element; both are left out of the
    pooling). None when the data has no list column."""
    label: torch.Tensor | None = None
    """[rows, outputs] float32: the objective's labels, made by the loader for a whole gather of
    rows (`TrainBatches` with `targets`); None: the module makes them from `behaviours`."""
    weight: torch.Tensor | None = None
    """[rows, outputs] float32: the objective's loss weights, made with `label`."""

    def __len__(self) -> int:
        return self.categorical.shape[0]

    def for_training(self) -> Batch:
        """The columns a training step reads: the group and the oracle columns serve the
        evaluation metrics only, so training batches leave them out (fewer rows to gather, to
        pin and to send from a loader's workers)."""
        return dataclasses.replace(self, group=None, oracle=None, oracle_positive=None)

    def index(self, rows: torch.Tensor | slice, pin: bool = False) -> Batch:
        """The rows' copy (a view for a slice). `pin`: cut straight into page-locked memory, so
        the copy to the GPU that follows can be asynchronous without a second host copy (needs
        a CUDA build; the caching host allocator reuses the blocks batch after batch)."""
        return Batch(**{f.name: _take(getattr(self, f.name), rows, pin) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> Batch:
        """Lightning moves batches with `batch.to(device)`, no arguments: so by default a copy
        to a CUDA device is asynchronous (it overlaps the step when the batch is pinned) and a
        copy to the host is not (host code could read it before it lands)."""
        device = torch.device(device)
        if non_blocking is None:
            non_blocking = device.type == "cuda"
        return Batch(
            **{
                f.name: None
                if (t := getattr(self, f.name)) is None
                else t.to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    def pin_memory(self) -> Batch:
        """What a DataLoader with `pin_memory=True` calls on each batch it yields."""
        return Batch(
            **{
                f.name: None if (t := getattr(self, f.name)) is None else t.pin_memory()
                for f in fields(self)
            }
        )

    def nbytes(self) -> int:
        return sum(t.nbytes for f in fields(self) if (t := getattr(self, f.name)) is not None)

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        def cat(name: str) -> torch.Tensor | None:
            parts = [getattr(b, name) for b in batches]
            return None if parts[0] is None else torch.cat(parts)

        return Batch(**{f.name: cat(f.name) for f in fields(Batch)})


def _take(
    tensor: torch.Tensor | None, rows: torch.Tensor | slice, pin: bool = False
) -> torch.Tensor | None:
    if tensor is None:
        return None
    if isinstance(rows, slice):
        view = tensor[rows]
        return _pinned(view.shape, view.dtype).copy_(view) if pin else view
    if not pin:
        return tensor.index_select(0, rows)
    # Gathered straight into the pinned block: one host copy, not a gather and then a pin.
    out = _pinned((len(rows), *tensor.shape[1:]), tensor.dtype)
    return torch.index_select(tensor, 0, rows, out=out)


def _pinned(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)
