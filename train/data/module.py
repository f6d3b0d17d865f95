"""The LightningDataModule: finds and checks the three splits against the data contract and the
weight scheme before anything is trained or written, measures the training split in one pass,
and serves batches from memory or streamed from storage.

Longer than 450 lines because `prepare()` is one ordered pass over every split (find, check
the types, learn the vocabularies, load or scan, measure) and its steps live beside it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import lightning as L
import numpy as np
import pyarrow as pa
import torch

from train.data.batch import Batch, Targets
from train.data.config import check_settings, spec_from_config
from train.data.device import TablePlacement, require_cuda
from train.data.features import (
    DataError,
    FeatureSpec,
    check_ids,
    check_schema,
    featurize,
    numeric_block,
    table_ids,
)
from train.data.io import (
    FileInfo,
    TableFormat,
    expand,
    inspect,
    protocol,
    read_chunks,
)
from train.data.loader import EvalBatches, TrainBatches
from train.data.stats import (
    StatsAccumulator,
    TrainStats,
    check_evaluation,
    check_label,
    check_training,
)
from train.data.stream import StreamBatches, StreamDataset, StreamTrainBatches, Unit
from train.data.vocabulary import (
    COLLISION_WARNING,
    VOCAB,
    IdCounter,
    Vocabulary,
    collision_rate,
)
from train.secrets import safe_url
from train.weights import WeightScheme

SPLITS = ("train", "val", "test")
GIB = 1 << 30

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class TableSource(Protocol):
    """Anything that hands out whole splits as Arrow tables (e.g. the feed simulator)."""

    def table(self, split: str) -> pa.Table: ...


class ImpressionDataModule(TablePlacement, L.LightningDataModule):
    """Impressions from files (any fsspec URL) or a simulator.

    `mode`: `memory` loads every split into tensors once (batches by indexing: the fast path);
    `stream` reads Parquet row groups / CSV files on the fly in DataLoader workers (memory
    bounded whatever the data size; see `train.data.stream`); `auto` streams when the loaded
    tensors would exceed `memory_limit_gb` (rows from the Parquet footers x bytes per row; CSV
    counted by file size). `device`: where memory mode keeps the tables on a CUDA run, and
    pinned batches otherwise (`TablePlacement`).
    """

    def __init__(
        self,
        *,
        categorical: Mapping[str, int],
        dense: Sequence[str],
        behaviours: Mapping[str, Any],
        group_key: str,
        train: str | Sequence[str] | None = None,
        val: str | Sequence[str] | None = None,
        test: str | Sequence[str] | None = None,
        oracle: Mapping[str, str] | None = None,
        oracle_positive: Mapping[str, str] | None = None,
        simulator: TableSource | None = None,
        batch_size: int = 4096,
        eval_batch_size: int = 16384,
        format: str = "auto",
        delimiter: str | None = None,
        header: bool = True,
        column_names: Sequence[str] = (),
        storage_options: dict[str, Any] | None = None,
        seed: int = 0,
        mode: str = "auto",
        memory_limit_gb: float = 8.0,
        num_workers: int = 2,
        shuffle_buffer: int = 262_144,
        worker_start: str = "forkserver",
        dense_fill: str = "mean",
        device: str = "auto",
        sequences: Mapping[str, Any] | None = None,
        min_count: int = 1,
        list_delimiter: str = "|",
    ) -> None:
        super().__init__()
        self.spec = spec_from_config(
            categorical,
            dense,
            behaviours,
            group_key,
            oracle,
            oracle_positive,
            dense_fill,
            sequences,
            min_count,
        )
        self.urls = {"train": train, "val": val, "test": test}
        check_settings(
            urls=self.urls,
            simulated=simulator is not None,
            storage_options=storage_options,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            mode=mode,
            memory_limit_gb=memory_limit_gb,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            worker_start=worker_start,
            device=device,
        )
        self.simulator = simulator
        self.table_format = TableFormat(
            format, delimiter, header, column_names, list_delimiter, tuple(self.spec.sequences)
        )
        self.storage_options = dict(storage_options or {})
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.requested_mode = mode
        self.mode = "memory" if simulator is not None else mode
        self.memory_limit_gb = memory_limit_gb
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.worker_start = worker_start
        self.device, self.target = device, None
        require_cuda(device, self.mode)  # before any data is read
        self.tables: dict[str, Batch] = {}
        self.units: dict[str, list[Unit]] = {}
        self.files: dict[str, list[FileInfo]] = {}
        self.dictionary: list[str] = []
        self.stats: TrainStats | None = None
        self.targets: Targets | None = None
        """The objective's `targets` for the span of a fit (`RankingModule.setup`, taken back by
        its `teardown`, or by `on_exception` here when the fit fails): memory-mode training
        batches then come with their labels and weights."""
        self.weight_mean = 1.0
        self.id_summary: dict[str, dict[str, Any]] = {}

    def describe(self, split: str) -> str:
        if self.simulator is not None:
            return f"simulated {split} split"
        urls = self.urls[split]
        shown = [safe_url(u) for u in ([urls] if isinstance(urls, str) else list(urls or []))]
        return f"data.{split} ({shown[0] if len(shown) == 1 else shown})"

    # ---------------------------------------------------------------- checks and statistics

    def prepare(
        self,
        scheme: WeightScheme | None = None,
        stats: TrainStats | None = None,
        splits: Sequence[str] = SPLITS,
    ) -> TrainStats:
        """Find and check every split, measure the training split, check the scheme's weights on
        it. Runs on every rank, before the trainer writes anything. Evaluation and prediction
        pass the saved `stats` (and leave "train" out of `splits`) to skip the training pass.

        Values checked on every row of every split (both modes), each error naming the file and
        column: ids hashable (no non-integral or infinite float ids; NaN is a null), dense
        values finite (NaN or null is missing, filled; ±inf is refused), behaviours finite and
        >= 0, the scheme's weights finite and >= 0; then the statistics as a whole
        (`train.data.stats`: check_training, check_label, check_evaluation)."""
        names = self.spec.behaviour_names
        if scheme is not None:
            scheme.check_behaviours(names)
        if "train" not in splits and stats is None:
            raise DataError("prepare() without the train split needs the saved training stats")
        if self.simulator is not None:
            raw = {split: self.simulator.table(split) for split in splits}
            if "train" in splits:
                counters = _new_counters(self.spec)
                _count(counters, raw["train"], self.spec, self.describe("train"))
                self._learn_ids(counters)
            for split in splits:
                self.tables[split] = featurize(raw.pop(split), self.spec, self.describe(split))
            if "train" in splits:
                stats = self._measure_memory(
                    [self._chunk_stats(self.tables["train"], scheme, self.describe("train"))]
                )
            self._check_evaluation_tables(splits, scheme)
            return self._keep(stats, scheme, "train" in splits)

        threads = min(32, 4 * (os.cpu_count() or 1))
        kinds: dict[str, tuple[str, str]] = {}
        for split in splits:
            urls = expand(self.urls[split], self.storage_options)
            infos = list(_ordered_map(self._inspect, urls, threads))
            for info in infos:
                self._check_kinds(info, kinds)
            self.files[split] = infos
        self.dictionary = [
            c for c, (kind, _) in kinds.items() if kind == "string" and c not in self.spec.sequences
        ]
        self._check_shared_kinds(kinds)
        self.mode = self._choose_mode(splits)
        if "train" in splits:
            self._learn_ids(self._count_ids(self.files["train"]))

        readers = max(1, min(8, os.cpu_count() or 1))
        if self.mode == "memory":
            for split in splits:
                per_file = list(
                    _ordered_map(
                        lambda f, s=split: self._load_file(f, scheme, s), self.files[split], readers
                    )
                )
                batches = [b for parts, _ in per_file for b in parts]
                self.tables[split] = Batch.concat(batches)
                if split == "train":
                    stats = self._measure_memory([p for _, parts in per_file for p in parts])
            self._check_evaluation_tables(splits, scheme)
        else:
            for split in splits:
                measure = split == "train"
                total = StatsAccumulator(names, len(self.spec.dense))
                self.units[split] = []
                scans = _ordered_map(
                    lambda f, m=measure: self._scan_file(f, scheme if m else None),
                    self.files[split],
                    readers,
                )
                for units, parts in scans:  # merged as they come: memory stays flat
                    self.units[split] += units
                    for part in parts:
                        total.merge(part)
                if measure:
                    stats = self._measure_memory([total])
                else:
                    self._check_evaluation(split, scheme, total.positive, total.rows)
        return self._keep(stats, scheme, "train" in splits)

    def _count_ids(self, files: Sequence[FileInfo]) -> dict[str, IdCounter]:
        """The id pass over the training split: every table's distinct ids with their counts
        (vocabularies) or hashes (collisions), reading only the id and list columns."""
        columns = [*self.spec.categorical, *self.spec.sequences]
        readers = max(1, min(8, os.cpu_count() or 1))

        def count_file(info: FileInfo) -> dict[str, IdCounter]:
            counters = _new_counters(self.spec)
            for table in self._chunks(info, columns):
                _count(counters, table, self.spec, safe_url(info.url))
            return counters

        total = _new_counters(self.spec)
        for counters in _ordered_map(count_file, files, readers):
            for name, counter in counters.items():
                total[name].merge(counter)
        return total

    def _learn_ids(self, counters: Mapping[str, IdCounter]) -> None:
        """Build the vocabularies into the spec (every split is then read with them) and
        measure the hashed tables' collisions; warn where they cost."""
        vocabularies, self.id_summary = {}, {}
        for name, encoding in self.spec.tables.items():
            if encoding == VOCAB:
                vocabularies[name] = Vocabulary.build(counters[name], self.spec.min_count)
                self.id_summary[name] = vocabularies[name].summary()
                continue
            hashes = counters[name].table().column("id").to_numpy()
            rate = collision_rate(hashes, int(encoding))
            self.id_summary[name] = {
                "encoding": "hash",
                "distinct": len(hashes),
                "rows": int(encoding),
                "collision_rate": rate,
            }
            if rate > COLLISION_WARNING:
                log.warning(
                    "%s: table %r: %.1f%% of its %d distinct training ids share a hash bucket "
                    "with another id (%d buckets): collisions blur their embeddings. Give it "
                    "more buckets, or an exact vocabulary (list it in data.categorical without "
                    "a bucket count, or {%s: vocab})",
                    self.describe("train"),
                    name,
                    100 * rate,
                    len(hashes),
                    int(encoding),
                    name,
                )
        self.spec = self.spec.with_vocabularies(vocabularies)

    def _check_shared_kinds(self, kinds: Mapping[str, tuple[str, str]]) -> None:
        """A list sharing a table holds the table column's ids: text elements can spell the
        integers of an integer table (CSV cells), but integers never match text ids."""
        for column, seq in self.spec.sequences.items():
            if seq.table is None or column not in kinds or seq.table not in kinds:
                continue
            (element, url), (ids, _) = kinds[column], kinds[seq.table]
            if element == "int" and ids == "string":
                raise DataError(
                    f"{safe_url(url)}: list column {column!r} holds integer ids but its table "
                    f"{seq.table!r} holds text ids; expected ids of one type (an id 7 and a "
                    "text '7' are different ids)"
                )

    def _keep(
        self, stats: TrainStats | None, scheme: WeightScheme | None, measured: bool = True
    ) -> TrainStats:
        assert stats is not None
        if measured:
            stats.ids = dict(self.id_summary)
        self.stats = stats
        self.weight_mean = stats.weight_mean
        if scheme is not None and measured:
            check_label(stats, self.spec.behaviours, scheme.label, self.describe("train"))
        if scheme is not None and self.weight_mean <= 0:
            raise DataError(
                f"{scheme.describe()}: every training weight is 0 on {self.describe('train')}; "
                "nothing would be learned"
            )
        return stats

    def _check_evaluation_tables(self, splits: Sequence[str], scheme: WeightScheme | None) -> None:
        for split in splits:
            if split != "train" and split in self.tables:
                behaviours = self.tables[split].behaviours
                positive = (behaviours > 0).sum(0).numpy()
                self._check_evaluation(split, scheme, positive, len(behaviours))

    def _check_evaluation(
        self, split: str, scheme: WeightScheme | None, positive: np.ndarray, rows: int
    ) -> None:
        if scheme is not None:
            label = self.spec.behaviour_names.index(scheme.label)
            check_evaluation(int(positive[label]), rows, scheme.label, self.describe(split), split)

    def _measure_memory(self, parts: Iterable[StatsAccumulator]) -> TrainStats:
        total = StatsAccumulator(self.spec.behaviour_names, len(self.spec.dense))
        for part in parts:
            total.merge(part)
        check_training(total, self.spec.dense, self.describe("train"))
        return total.result()

    def _chunk_stats(
        self, batch: Batch | tuple[np.ndarray, np.ndarray], scheme: WeightScheme | None, where: str
    ) -> StatsAccumulator:
        dense, behaviours = (batch.dense, batch.behaviours) if isinstance(batch, Batch) else batch
        behaviours = torch.as_tensor(behaviours)
        weights = None
        if scheme is not None:
            names = self.spec.behaviour_names
            scheme.check_values(behaviours, names, where)
            weights = scheme.weights(behaviours, names)
        return StatsAccumulator.chunk(self.spec.behaviour_names, dense, behaviours, weights)

    def _inspect(self, url: str) -> FileInfo:
        return inspect(url, self.table_format, self.storage_options)

    def _check_kinds(self, info: FileInfo, kinds: dict[str, tuple[str, str]]) -> None:
        """An id column must hash the same way in every file (ints and strings never match)."""
        found = check_schema(info.schema, self.spec, safe_url(info.url))
        for column, kind in found.items():
            if pa.types.is_null(_base_type(info.schema.field(column).type)):
                continue  # all null here: bucket 0 whatever the type elsewhere
            seen = kinds.setdefault(column, (kind, info.url))
            if seen[0] != kind:
                raise DataError(
                    f"{safe_url(info.url)}: id column {column!r} holds {kind} values but "
                    f"{safe_url(seen[1])} holds {seen[0]} values; ids must have one type in every "
                    "file (an id 7 and a string '7' hash to different buckets)"
                )

    def _choose_mode(self, splits: Sequence[str]) -> str:
        if self.requested_mode != "auto":
            return self.requested_mode
        spec = self.spec
        row_bytes = 8 * len(spec.categorical) + 4 * len(spec.dense) + 4 * len(spec.behaviours)
        row_bytes += 8 * spec.list_width
        row_bytes += 8 + 8 * len(spec.oracle_names)
        estimate = 0
        for split in splits:
            for info in self.files[split]:
                rows = sum(info.row_groups) if info.row_groups is not None else None
                estimate += rows * row_bytes if rows is not None else max(info.size, 0)
        mode = "memory" if estimate <= self.memory_limit_gb * GIB else "stream"
        log.info(
            "data.mode=auto: %s (about %.2f GiB of tensors; data.memory_limit_gb=%g)",
            mode,
            estimate / GIB,
            self.memory_limit_gb,
        )
        return mode

    def _numeric_and_float_ids(self, info: FileInfo) -> list[str]:
        spec = self.spec
        floats = [
            c
            for c in spec.id_columns
            if info.kind == "csv" or pa.types.is_floating(_base_type(info.schema.field(c).type))
        ]
        return list(dict.fromkeys([*spec.dense, *spec.behaviours.values(), *floats]))

    def _chunks(self, info: FileInfo, columns: Sequence[str]) -> Iterator[pa.Table]:
        dictionary = [c for c in self.dictionary if c in columns]
        return read_chunks(
            info.url, columns, self.table_format, self.storage_options, dictionary=dictionary
        )

    def _load_file(
        self, info: FileInfo, scheme: WeightScheme | None, split: str
    ) -> tuple[list[Batch], list[StatsAccumulator]]:
        """Memory mode: one file, featurised chunk by chunk (with its chunk statistics)."""
        source = safe_url(info.url)
        batches, parts = [], []
        for table in self._chunks(info, self.spec.columns):
            batch = featurize(table, self.spec, source)
            batches.append(batch)
            if split == "train":
                parts.append(self._chunk_stats(batch, scheme, source))
        if not batches or sum(len(b) for b in batches) == 0:
            raise DataError(f"{source}: the file has no rows")
        return batches, parts

    def _scan_file(
        self, info: FileInfo, scheme: WeightScheme | None
    ) -> tuple[list[Unit], list[StatsAccumulator]]:
        """Stream mode: check one file's values and count its rows, reading only the columns
        checks and statistics need (dense, behaviours, float ids), and measure them (with the
        scheme's weights for the training split)."""
        source = safe_url(info.url)
        columns = self._numeric_and_float_ids(info)
        rows, parts = 0, []
        for table in self._chunks(info, columns):
            check_ids(table, self.spec, source)
            block = numeric_block(table, self.spec, source)
            rows += table.num_rows
            parts.append(self._chunk_stats(block, scheme, source))
        if rows == 0:
            raise DataError(f"{source}: the file has no rows")
        if info.row_groups is None:
            return [Unit(info.url, rows)], parts
        if rows != sum(info.row_groups):
            raise DataError(f"{source}: row count changed while reading (was the file rewritten?)")
        units = [Unit(info.url, n, i) for i, n in enumerate(info.row_groups) if n > 0]
        return units, parts

    # ---------------------------------------------------------------- batches

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _workers(self, split: str) -> int:
        # memory:// lives in this process only: worker processes could not see it.
        if any(protocol(u.url) == "memory" for u in self.units[split]):
            return 0
        return self.num_workers

    def _stream(self, split: str, train: bool) -> StreamDataset:
        rank, world = self._rank()
        return StreamDataset(
            self.units[split],
            self.spec,
            self.table_format,
            self.storage_options,
            train=train,
            batch_size=self.batch_size if train else self.eval_batch_size,
            rank=rank,
            world=world,
            workers=max(1, self._workers(split)),
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            dictionary=self.dictionary,
        )

    def on_exception(self, exception: BaseException) -> None:
        # Lightning skips the teardown hooks when a fit raises: no loader built after it may
        # carry that fit's objective.
        self.targets = None

    def train_dataloader(self) -> TrainBatches | StreamTrainBatches:
        if self.mode == "memory":
            rank, world = self._rank()
            table = self.tables["train"]
            pin = self.pin(table)
            # Not for pinned batches: those go to a GPU, where the module's own targets cost the
            # host nothing, and made on the host they would not be pinned.
            targets = None if pin else self.targets
            return TrainBatches(
                table, self.batch_size, self.seed, rank, world, pin, targets=targets
            )
        stream = self._stream("train", True)
        return StreamTrainBatches(
            stream, self._workers("train"), self.worker_start, pin_memory=self.pin()
        )

    def val_dataloader(self) -> EvalBatches | StreamBatches:
        return self._eval("val")

    def test_dataloader(self) -> EvalBatches | StreamBatches:
        return self._eval("test")

    def _eval(self, split: str) -> EvalBatches | StreamBatches:
        if self.mode == "memory":
            table = self.tables[split]
            return EvalBatches(table, self.eval_batch_size, *self._rank(), self.pin(table))
        stream = self._stream(split, False)
        return StreamBatches(stream, self._workers(split), self.worker_start, pin_memory=self.pin())


def _new_counters(spec: FeatureSpec) -> dict[str, IdCounter]:
    return {name: IdCounter() for name in spec.tables}


def _count(
    counters: Mapping[str, IdCounter], table: pa.Table, spec: FeatureSpec, source: str
) -> None:
    for name, ids in table_ids(table, spec, source).items():
        for part in ids:
            try:
                counters[name].add(part)
            except TypeError as err:
                raise DataError(
                    f"{source}: table {name!r} ({', '.join(spec.table_columns(name))}): {err}; "
                    "expected ids of one type in every file and list"
                ) from err


def _base_type(kind: pa.DataType) -> pa.DataType:
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _ordered_map(fn: Callable[[T], R], items: Sequence[T], threads: int) -> Iterator[R]:
    """`map` over a thread pool with results in input order and at most 2 x threads in flight
    (so a pass over many files never holds more than a few files' results)."""
    if threads <= 1 or len(items) <= 1:
        yield from (fn(item) for item in items)
        return
    pool = ThreadPoolExecutor(threads)
    try:
        pending: list[Future] = []
        queue = iter(items)
        for item in queue:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                break
        while pending:
            result = pending.pop(0).result()
            for item in queue:
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
