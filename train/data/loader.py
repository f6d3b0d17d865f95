"""Batches by slicing in-memory tensors (the fast path), split across DDP ranks so that every
rank yields the same number of batches and no row is duplicated or dropped."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch

from train.data.batch import Batch, Targets

GATHER_ROWS = 32_768
"""Training rows gathered at once (whole batches; at least one): big enough that the gather
runs at its bulk rate, small enough to add a few MB at most."""


class EpochPosition:
    """Where a training loader is: its epoch and the batches of it already yielded, saved in
    every checkpoint (`state_dict`) so that a resumed run continues with the exact batch
    sequence of an uninterrupted one.

    The trainer's epoch is the authority: Lightning calls `loader.sampler.set_epoch(epoch)` at
    every epoch's start, and restores no loader state from a checkpoint written at an epoch's
    end (it counts that epoch as finished), so the loader learns the next epoch from that call.
    """

    seed: int
    epoch: int = 0
    batches_done: int = 0

    @property
    def sampler(self) -> EpochPosition:
        return self  # where Lightning looks for `set_epoch`

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def _start(self) -> int:
        """The batch an `iter()` starts at; a finished epoch rolls over to the next (the trainer
        stops after len() batches without exhausting the generator, and a loader iterated
        without a trainer gets no `set_epoch`)."""
        if self.batches_done >= len(self):  # type: ignore[arg-type]
            self.epoch += 1
            self.batches_done = 0
        return self.batches_done

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])


class TrainBatches(EpochPosition):
    """Shuffled training batches; one global batch of `batch_size * world_size` rows is cut into
    `world_size` near-equal pieces, one per rank.

    So 1 process at batch 2B and 2 processes at batch B see the same global batches, in the same
    order; every row is used once per epoch. The last global batch is smaller; if it has fewer
    rows than ranks it is dropped (at most world_size - 1 rows an epoch) so no rank gets an
    empty batch. The permutation is re-drawn each epoch from (seed, epoch).

    Batches are sliced on the table's own device (a table resident on the GPU makes GPU
    batches); `pin` cuts them into pinned host memory, for a host table feeding a CUDA run.
    `targets` (an objective's, on the table's device): every batch carries its labels and
    weights, made for a whole gather at once (`Batch.label`, `Batch.weight`).
    """

    def __init__(
        self,
        table: Batch,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin: bool = False,
        gather_rows: int = GATHER_ROWS,
        targets: Targets | None = None,
    ) -> None:
        self.table = table.for_training()
        self.targets = targets
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pin = pin
        self.gather_rows = gather_rows
        self.epoch = 0
        self.batches_done = 0

    def __len__(self) -> int:
        rows, global_batch = len(self.table), self.batch_size * self.world_size
        full, tail = divmod(rows, global_batch)
        return full + (tail >= self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        start = self._start()
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.table), generator=generator)
        order = order.to(self.table.categorical.device)
        # Rows are gathered for several batches at once, and each batch is a view of that
        # gather: one gather of ~32k random rows costs less than half as much per row as
        # eight of 4,096 (bench/profile.py's data part), and the batches are the same.
        per_gather = max(1, self.gather_rows // self.batch_size)
        for first in range(start, len(self), per_gather):
            last = min(first + per_gather, len(self))
            pieces = [self._rows(order, step) for step in range(first, last)]
            gathered = self.table.index(torch.cat(pieces), self.pin)
            if self.targets is not None:
                # The objective's dozen small ops once a gather, not once a batch.
                label, weight = self.targets(gathered.behaviours)
                gathered = dataclasses.replace(gathered, label=label, weight=weight)
            begin = 0
            for piece in pieces:
                self.batches_done += 1
                yield gathered.index(slice(begin, begin + len(piece)))
                begin += len(piece)

    def _rows(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's rows of the global batch `step`, from the epoch's permutation."""
        global_batch = self.batch_size * self.world_size
        rows = order[step * global_batch : (step + 1) * global_batch]
        return torch.tensor_split(rows, self.world_size)[self.rank]


class EvalBatches:
    """Evaluation batches in file order: each rank takes a contiguous near-equal share of the
    rows and cuts it into the same number of batches as every other rank, so all rows are
    scored exactly once across ranks (metrics are then computed over the union). Sliced on the
    table's device, pinned with `pin` (as `TrainBatches`)."""

    def __init__(
        self,
        table: Batch,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        pin: bool = False,
    ) -> None:
        # Indices on the table's device: CUDA's index_select refuses host indices.
        rows = torch.arange(len(table), device=table.categorical.device)
        share = torch.tensor_split(rows, world_size)[rank]
        self.table = table.index(share) if world_size > 1 else table
        largest = math.ceil(len(table) / world_size)
        self.num_batches = max(1, math.ceil(largest / batch_size))
        self.pin = pin

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        rows = torch.arange(len(self.table), device=self.table.categorical.device)
        for piece in torch.tensor_split(rows, self.num_batches):
            yield self.table.index(piece, self.pin)
