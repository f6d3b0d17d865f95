"""Statistics of the training split, computed once and kept with the model: dense means and
standard deviations (for standardising), which behaviours are binary, positive rates, and the
mean weight of the scheme (for `normalize: mean`).

They are accumulated chunk by chunk (one Parquet row group or CSV block at a time, in file
order), so a split larger than memory is measured in one streamed pass, and memory and stream
mode, which feed the same chunks in the same order, get bit-identical numbers.

The checks at the end read the statistics for what the job cannot use, naming the split and
column: no training rows; a dense column with no value in any training row (an error: there is
nothing to standardise it with, and a silent 0 would hide a broken column); a label with no
positive or no negative training row (nothing to learn). Warnings only: a constant dense
column, another behaviour never positive in training, an evaluation split whose label is all
0 or all > 0 (its AUC is undefined; the run still reports the rest).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from train.data.batch import Batch
from train.data.features import DataError

log = logging.getLogger(__name__)


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
    weight_mean: float = 1.0
    """Mean unnormalised weight of the run's scheme over the training rows (1 without one)."""
    ids: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Embedding table -> what the id pass found: distinct ids, rows, and the collision rate
    (hashed) or rare ids (vocabulary)."""

    @staticmethod
    def of(
        table: Batch, behaviour_names: Sequence[str], weights: torch.Tensor | None = None
    ) -> TrainStats:
        """Statistics of one in-memory table (a single chunk)."""
        acc = StatsAccumulator(behaviour_names, table.dense.shape[1])
        acc.update(table.dense, table.behaviours, weights)
        return acc.result()

    @staticmethod
    def from_dict(value: dict[str, Any]) -> TrainStats:
        """Back from `asdict` / stats.json (as saved in a run or a checkpoint)."""
        known = set(TrainStats.__dataclass_fields__)
        return TrainStats(**{k: v for k, v in value.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


class StatsAccumulator:
    """Streaming, mergeable statistics: per-chunk mean and sum of squared deviations combined
    with Chan et al.'s update, all in float64, NaN dense values skipped."""

    def __init__(self, behaviour_names: Sequence[str], num_dense: int) -> None:
        self.names = list(behaviour_names)
        self.rows = 0
        self.count = np.zeros(num_dense, dtype=np.int64)
        self.mean = np.zeros(num_dense, dtype=np.float64)
        self.m2 = np.zeros(num_dense, dtype=np.float64)
        self.positive = np.zeros(len(self.names), dtype=np.int64)
        self.total = np.zeros(len(self.names), dtype=np.float64)
        self.binary = np.ones(len(self.names), dtype=bool)
        self.weight_total = 0.0
        self.weighted = False

    def update(
        self,
        dense: np.ndarray | torch.Tensor,
        behaviours: np.ndarray | torch.Tensor,
        weights: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Add one chunk (the same as merging `StatsAccumulator.chunk(...)`)."""
        self.merge(StatsAccumulator.chunk(self.names, dense, behaviours, weights))

    @staticmethod
    def chunk(
        names: Sequence[str],
        dense: np.ndarray | torch.Tensor,
        behaviours: np.ndarray | torch.Tensor,
        weights: np.ndarray | torch.Tensor | None = None,
    ) -> StatsAccumulator:
        """The statistics of one chunk, to be merged in order (can run in a worker thread)."""
        dense = np.asarray(dense, dtype=np.float64)
        behaviours = np.asarray(behaviours, dtype=np.float64)
        part = StatsAccumulator(names, dense.shape[1])
        part.rows = behaviours.shape[0]
        present = ~np.isnan(dense)
        part.count = present.sum(0).astype(np.int64)
        part.mean = np.where(present, dense, 0.0).sum(0) / np.maximum(part.count, 1)
        part.m2 = (np.where(present, dense - part.mean, 0.0) ** 2).sum(0)
        part.positive = (behaviours > 0).sum(0).astype(np.int64)
        part.total = behaviours.sum(0)
        part.binary = ((behaviours == 0) | (behaviours == 1)).all(0)
        if weights is not None:
            part.weighted = True
            part.weight_total = float(np.asarray(weights, dtype=np.float64).sum())
        return part

    def merge(self, other: StatsAccumulator) -> None:
        """Fold in the statistics of the rows that follow (Chan et al.'s pairwise update)."""
        total = self.count + other.count
        delta = other.mean - self.mean
        ratio = np.divide(other.count, total, out=np.zeros_like(self.mean), where=total > 0)
        self.m2 = self.m2 + other.m2 + delta**2 * self.count * ratio
        self.mean = self.mean + delta * ratio
        self.count = total
        self.rows += other.rows
        self.positive += other.positive
        self.total += other.total
        self.binary &= other.binary
        self.weighted |= other.weighted
        self.weight_total += other.weight_total

    def result(self) -> TrainStats:
        rows = max(self.rows, 1)
        var = self.m2 / np.maximum(self.count, 1)
        std = np.sqrt(var)
        # Constant or all-missing columns get std 1 so standardising never divides by ~0.
        std = np.where(std > 1e-12, std, 1.0)
        return TrainStats(
            rows=self.rows,
            dense_mean=self.mean.tolist(),
            dense_std=std.tolist(),
            continuous=[n for n, b in zip(self.names, self.binary, strict=True) if not b],
            positive_rate={
                n: float(p / rows) for n, p in zip(self.names, self.positive, strict=True)
            },
            behaviour_mean={
                n: float(t / rows) for n, t in zip(self.names, self.total, strict=True)
            },
            weight_mean=self.weight_total / rows if self.weighted else 1.0,
        )


def check_training(acc: StatsAccumulator, dense: Sequence[str], where: str) -> None:
    """The training split as a whole: rows, and a value in every dense column."""
    if acc.rows == 0:
        raise DataError(f"{where}: the training split has no rows")
    empty = [c for c, n in zip(dense, acc.count, strict=True) if n == 0]
    if empty:
        raise DataError(
            f"{where}: dense column(s) {empty} hold no value in any row of the training split "
            "(every value null or NaN); expected numbers to standardise them with: fix the data "
            "or leave the column(s) out of data.dense"
        )
    for column, m2, mean in zip(dense, acc.m2, acc.mean, strict=True):
        if m2 == 0:
            log.warning(
                "%s: dense column %r holds one value (%g) in every row of the training split: "
                "it carries no information%s",
                where,
                column,
                mean,
                " (beyond 2**24, float32 cannot tell nearby integers apart: rescale it, e.g. a "
                "timestamp to an age in days)"
                if abs(mean) > 2**24
                else "",
            )


def check_label(stats: TrainStats, behaviours: Mapping[str, str], label: str, where: str) -> None:
    """The label must have positive and negative training rows; another behaviour that is
    never positive is worth a warning (its metrics are undefined, its terms weigh 0)."""
    for name, column in behaviours.items():
        rate = stats.positive_rate.get(name)
        role = "label behaviour" if name == label else "behaviour"
        what = f"{where}: {role} {name!r} (column {column!r})"
        if name == label and rate == 0:
            raise DataError(
                f"{what} is 0 in every row of the training split; expected some positive rows "
                "(> 0): with no positive there is nothing to learn"
            )
        if name == label and rate == 1:
            raise DataError(
                f"{what} is > 0 in every row of the training split; expected some negative rows "
                "(0): with no negative there is nothing to learn"
            )
        if rate == 0:
            log.warning(
                "%s is 0 in every row of the training split: its metrics are undefined and "
                "weight terms reading it weigh nothing",
                what,
            )


def check_evaluation(positive: int, rows: int, label: str, where: str, split: str) -> None:
    """A validation or test split whose label is all 0 (or all > 0) has no AUC: the run goes
    on and reports NaN there, so say which split and why, up front."""
    if rows and positive in (0, rows):
        log.warning(
            "%s: label behaviour %r is %s in every one of its %d rows: its AUC and GAUC are "
            "undefined (NaN)%s",
            where,
            label,
            "0" if positive == 0 else "> 0",
            rows,
            "; the monitored validation metric may be NaN" if split == "val" else "",
        )
