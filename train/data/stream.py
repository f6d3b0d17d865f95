"""Streaming batches from Parquet/CSV shards larger than memory, split across DDP ranks and
DataLoader workers without overlap, every rank yielding the same number of batches.

How an epoch is laid out (all of it computed from row counts, identically on every rank):

1. Units are Parquet row groups (or whole CSV files) with their row counts, found by
   `prepare()`. Training shuffles their order with a generator seeded by (seed, epoch);
   evaluation keeps file order.
2. The N rows of the units, in that order, are cut into `world` contiguous ranges of
   near-equal size (the first N % world ranks hold one row more). A rank reads only its range;
   a unit on a boundary is read by both neighbours, each keeping its own part.
3. Every rank yields the same number of batches K. Training: K = N // (B * world) +
   (N % (B * world) >= world), the in-memory loader's count; a rank's rows form K - 1 batches of
   B rows and a last batch with the rest (1 to B + 1 rows: the few rows the in-memory loader
   drops when the last global batch has fewer rows than ranks ride along here, so every row is
   used exactly once per epoch). Evaluation: K = ceil(ceil(N / world) / B), a rank's rows cut
   into K near-equal batches, so every row is scored exactly once.
4. DataLoader workers: batch j of a rank comes from worker slot j % W (the order in which a
   DataLoader collects from its workers); slot u reads a contiguous part of the rank's range
   holding exactly its batches' rows.
5. Shuffling (training): a slot's rows, in order, are cut into windows of `shuffle_buffer`
   rows; each window is permuted with a generator seeded by (seed, epoch, rank, slot, window)
   and batches are consecutive slices of the permuted windows. Memory per worker is bounded by
   one window plus one decoded batch (65,536 rows of a row group, or one CSV block), whatever
   the data size.

Resuming at batch b of an epoch skips, in each slot, the windows before b's rows without
reading them; the result is the exact batch sequence of an uninterrupted epoch (given the same
world size, workers, batch size and buffer).

Longer than 450 lines because the layout above and the code that computes it are one invariant
(equal batch counts, every row once): the ranges, slots, windows and resume skip stay together.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.data.batch import Batch
from train.data.features import DataError, FeatureSpec, featurize
from train.data.io import TableFormat, protocol, read_chunks
from train.data.loader import EpochPosition
from train.liveness import die_with
from train.secrets import safe_url


@dataclass(frozen=True)
class Unit:
    """The smallest piece a reader opens: one Parquet row group, or one whole CSV file."""

    url: str
    rows: int
    row_group: int | None = None


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of unit number `unit`."""

    unit: int
    start: int
    stop: int


@dataclass(frozen=True)
class SlotPlan:
    """What one worker slot of one rank reads and yields in one epoch."""

    slot: int
    pieces: tuple[Piece, ...]
    batch_ids: tuple[int, ...]
    """Rank-level batch indices this slot produces (slot, slot + W, ...)."""
    batch_sizes: tuple[int, ...]


def split_sizes(n: int, parts: int) -> list[int]:
    """Near-equal sizes, the first n % parts one larger (torch.tensor_split's rule)."""
    q, r = divmod(n, parts)
    return [q + (i < r) for i in range(parts)]


def train_batch_count(rows: int, batch_size: int, world: int) -> int:
    """Batches per rank per epoch; the same rule as the in-memory `TrainBatches`."""
    full, tail = divmod(rows, batch_size * world)
    return full + (tail >= world)


def eval_batch_count(rows: int, batch_size: int, world: int) -> int:
    """Batches per rank of an evaluation pass; the same rule as the in-memory `EvalBatches`."""
    return max(1, math.ceil(math.ceil(rows / world) / batch_size))


def unit_order(n_units: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n_units)
    return np.random.default_rng([seed % 2**63, epoch]).permutation(n_units)


def cut(unit_rows: np.ndarray, order: np.ndarray, start: int, stop: int) -> tuple[Piece, ...]:
    """Rows [start, stop) of the units concatenated in `order`, as pieces of units."""
    if stop <= start:
        return ()
    ends = np.cumsum(unit_rows[order])
    begins = ends - unit_rows[order]
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(begins, stop, side="left"))
    pieces = []
    for k in range(first, last):
        a, b = max(start, int(begins[k])), min(stop, int(ends[k]))
        if a < b:
            pieces.append(Piece(int(order[k]), a - int(begins[k]), b - int(begins[k])))
    return tuple(pieces)


def plan_slot(
    unit_rows: Sequence[int],
    *,
    train: bool,
    batch_size: int,
    rank: int,
    world: int,
    slot: int,
    workers: int,
    seed: int = 0,
    epoch: int = 0,
) -> SlotPlan:
    """The pieces and batches of one (rank, slot) in one epoch; see the module docstring."""
    rows = np.asarray(unit_rows, dtype=np.int64)
    total = int(rows.sum())
    rank_sizes = split_sizes(total, world)
    rank_start, rank_rows = sum(rank_sizes[:rank]), rank_sizes[rank]
    if train:
        count = train_batch_count(total, batch_size, world)
        if count < 1:
            raise DataError(
                f"the training split has {total} rows, fewer than the {world} ranks: every rank "
                "needs at least one row per epoch"
            )
        sizes = [batch_size] * (count - 1) + [rank_rows - (count - 1) * batch_size]
    else:
        count = eval_batch_count(total, batch_size, world)
        sizes = split_sizes(rank_rows, count)
    slot_rows = [sum(sizes[u::workers]) for u in range(workers)]
    start = rank_start + sum(slot_rows[:slot])
    order = unit_order(len(rows), seed, epoch, train)
    return SlotPlan(
        slot=slot,
        pieces=cut(rows, order, start, start + slot_rows[slot]),
        batch_ids=tuple(range(slot, count, workers)),
        batch_sizes=tuple(sizes[slot::workers]),
    )


def empty_batch(spec: FeatureSpec) -> Batch:
    oracle = len(spec.oracle_names)
    return Batch(
        categorical=torch.zeros((0, len(spec.categorical)), dtype=torch.int64),
        dense=torch.zeros((0, len(spec.dense)), dtype=torch.float32),
        behaviours=torch.zeros((0, len(spec.behaviours)), dtype=torch.float32),
        group=torch.zeros(0, dtype=torch.int64),
        oracle=torch.zeros((0, oracle), dtype=torch.float32) if oracle else None,
        oracle_positive=torch.zeros((0, oracle), dtype=torch.float32) if oracle else None,
        sequences=torch.zeros((0, spec.list_width), dtype=torch.int64) if spec.sequences else None,
    )


class StreamDataset(IterableDataset):
    """One rank's batches of one split, read in DataLoader workers (or in-process).

    Everything a worker needs is plain data, so it pickles into spawned workers; filesystems
    are opened inside the worker (fsspec/s3fs clients are not fork-safe)."""

    def __init__(
        self,
        units: Sequence[Unit],
        spec: FeatureSpec,
        table_format: TableFormat,
        storage_options: Mapping[str, Any] | None,
        *,
        train: bool,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 262_144,
        dictionary: Sequence[str] = (),
    ) -> None:
        if not units:
            raise DataError("no rows to stream")
        self.units = list(units)
        self.unit_rows = [u.rows for u in self.units]
        self.spec = spec
        self.table_format = table_format
        self.storage_options = dict(storage_options or {})
        self.train = train
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.workers = max(1, workers)
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.dictionary = list(dictionary)
        self.rows = sum(self.unit_rows)
        self.num_batches = (train_batch_count if train else eval_batch_count)(
            self.rows, batch_size, world
        )
        self.epoch = 0
        self.start = 0
        """Batches of this epoch already consumed (resume point); training only."""

    def plan(self, slot: int) -> SlotPlan:
        return plan_slot(
            self.unit_rows,
            train=self.train,
            batch_size=self.batch_size,
            rank=self.rank,
            world=self.world,
            slot=slot,
            workers=self.workers,
            seed=self.seed,
            epoch=self.epoch,
        )

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"dataset planned for {self.workers} workers, run by {workers}")
        # Worker w plays slot (w + start) % W so that, after a resume at batch `start`, the
        # DataLoader's round-robin collection still yields batches in their original order.
        slot = (worker + self.start) % workers if self.train else worker
        plan = self.plan(slot)
        if self.train:
            yield from self._train_batches(plan)
        else:
            yield from self._eval_batches(plan)

    def _train_batches(self, plan: SlotPlan) -> Iterator[Batch]:
        skipped = sum(1 for j in plan.batch_ids if j < self.start)
        offset = sum(plan.batch_sizes[:skipped])
        total = sum(plan.batch_sizes)
        size = self.shuffle_buffer
        window = offset // size
        rows = _Rows(self._tables(plan.pieces, window * size))
        current, order, position = None, None, offset - window * size
        for need in plan.batch_sizes[skipped:]:
            parts = []
            while need:
                if current is None or position == len(current):
                    if current is not None:
                        window += 1
                        position = 0
                    length = min(size, total - window * size)
                    current = self._featurize(rows.take(length)).for_training()
                    generator = np.random.default_rng(
                        [self.seed % 2**63, self.epoch, self.rank, plan.slot, window]
                    )
                    order = torch.from_numpy(generator.permutation(length))
                take = min(need, len(current) - position)
                parts.append(current.index(order[position : position + take]))
                position += take
                need -= take
            yield parts[0] if len(parts) == 1 else Batch.concat(parts)

    def _eval_batches(self, plan: SlotPlan) -> Iterator[Batch]:
        rows = _Rows(self._tables(plan.pieces, 0))
        for need in plan.batch_sizes:
            yield self._featurize(rows.take(need)) if need else empty_batch(self.spec)

    def _featurize(self, tables: list[tuple[str, pa.Table]]) -> Batch:
        parts = [featurize(table, self.spec, safe_url(url)) for url, table in tables]
        return parts[0] if len(parts) == 1 else Batch.concat(parts)

    def _tables(self, pieces: Sequence[Piece], skip: int) -> Iterator[tuple[str, pa.Table]]:
        """The pieces' rows in order, as (url, table) chunks, from row `skip` of the slot on.
        Pieces wholly before `skip` are not read."""
        columns = self.spec.columns
        position = 0
        for piece in pieces:
            length = piece.stop - piece.start
            if position + length <= skip:
                position += length
                continue
            start = piece.start + max(0, skip - position)
            position += length
            unit = self.units[piece.unit]
            groups = None if unit.row_group is None else [unit.row_group]
            chunks = read_chunks(
                unit.url, columns, self.table_format, self.storage_options, groups, self.dictionary
            )
            offset = 0  # row of the unit where the current chunk begins
            for chunk in chunks:
                a, b = max(start, offset), min(piece.stop, offset + chunk.num_rows)
                if a < b:
                    yield unit.url, chunk.slice(a - offset, b - a)
                offset += chunk.num_rows
                if offset >= piece.stop:
                    chunks.close()
                    break


class _Rows:
    """Takes exact row counts from a stream of (url, table) chunks."""

    def __init__(self, chunks: Iterator[tuple[str, pa.Table]]) -> None:
        self.chunks = chunks
        self.left: tuple[str, pa.Table] | None = None

    def take(self, n: int) -> list[tuple[str, pa.Table]]:
        out = []
        while n > 0:
            if self.left is None:
                try:
                    self.left = next(self.chunks)
                except StopIteration:
                    raise RuntimeError(
                        "stream plan asks for more rows than its units hold"
                    ) from None
            url, table = self.left
            if table.num_rows <= n:
                out.append(self.left)
                n -= table.num_rows
                self.left = None
            else:
                out.append((url, table.slice(0, n)))
                self.left = (url, table.slice(n))
                n = 0
        return out


def _init_worker(rank_pid: int, worker_id: int) -> None:
    # One Arrow thread per worker: the workers are the parallelism.
    pa.set_cpu_count(1)
    # A forkserver's worker is no child of its rank: without this it outlives a killed rank.
    die_with(rank_pid)


def loader_context(
    worker_start: str, protocols: Iterable[str] = ()
) -> multiprocessing.context.BaseContext:
    """The multiprocessing context for DataLoader workers. forkserver (the default) and spawn
    start workers from a clean process, never from a parent holding open s3fs/gcsfs clients;
    forkserver imports this module (and the filesystems of `protocols`, e.g. s3fs) once, so a
    worker starts in milliseconds instead of re-importing torch and botocore each epoch."""
    if worker_start not in multiprocessing.get_all_start_methods():
        raise DataError(
            f"data.worker_start={worker_start!r} is not available here; choose one of "
            f"{multiprocessing.get_all_start_methods()}"
        )
    context = multiprocessing.get_context(worker_start)
    if worker_start == "forkserver":
        context.set_forkserver_preload(["train.data.stream", *_filesystem_modules(protocols)])
    return context


def _filesystem_modules(protocols: Iterable[str]) -> list[str]:
    from fsspec.registry import known_implementations

    modules = []
    for name in sorted(set(protocols)):
        target = known_implementations.get(name or "file", {}).get("class", "")
        if target:
            modules.append(target.rsplit(".", 1)[0])
    return list(dict.fromkeys(modules))


@contextmanager
def _main_script_hidden() -> Iterator[None]:
    """While workers start, keep them from re-importing the main script or module (what
    spawn/forkserver children do by default: seconds of imports per worker per epoch). A stream
    worker needs nothing from `__main__`: everything it unpickles lives in `train.data`."""
    main = sys.modules.get("__main__")
    saved = {k: vars(main)[k] for k in ("__file__", "__spec__") if main and k in vars(main)}
    if not saved:
        yield
        return
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)


class StreamBatches:
    """What the trainer iterates: `len()` batches per pass on every rank, read by a DataLoader
    over a `StreamDataset` (evaluation: file order, every row once across ranks). `pin_memory`
    (CUDA runs only): batches are pinned as they arrive, so their copies to the GPU are
    asynchronous."""

    def __init__(
        self,
        dataset: StreamDataset,
        num_workers: int = 0,
        worker_start: str = "forkserver",
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if max(1, num_workers) != dataset.workers:
            raise ValueError("stream.workers must be max(1, num_workers)")
        self.stream = dataset
        self.num_workers = num_workers
        protocols = {protocol(unit.url) for unit in dataset.units}
        self.context = loader_context(worker_start, protocols) if num_workers > 0 else None
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return self.stream.num_batches

    def __iter__(self) -> Iterator[Batch]:
        yield from self._batches()

    def _batches(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            multiprocessing_context=self.context,
            worker_init_fn=partial(_init_worker, os.getpid()) if self.num_workers else None,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            pin_memory=self.pin_memory,
        )
        with _main_script_hidden():
            batches = iter(loader)  # starts the workers
        yield from batches


class StreamTrainBatches(StreamBatches, EpochPosition):
    """Training batches, reshuffled each epoch, resumable mid-epoch like the in-memory
    `TrainBatches` (`EpochPosition`)."""

    def __init__(self, dataset: StreamDataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.seed = dataset.seed
        self.epoch = 0
        self.batches_done = 0

    def __iter__(self) -> Iterator[Batch]:
        start = self._start()  # first: a finished epoch rolls over to the next
        self.stream.epoch, self.stream.start = self.epoch, start
        for batch in self._batches():
            self.batches_done += 1
            yield batch
