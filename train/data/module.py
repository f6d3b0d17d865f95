"""The LightningDataModule: reads the three splits, checks them against the data contract and
the weight scheme before anything is trained or written, and serves batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import lightning as L
import pyarrow as pa

from train.data.batch import Batch
from train.data.features import DataError, FeatureSpec, featurize
from train.data.io import TableFormat, expand, read_table
from train.data.loader import EvalBatches, TrainBatches
from train.data.stats import TrainStats
from train.weights import WeightScheme

SPLITS = ("train", "val", "test")


class TableSource(Protocol):
    """Anything that hands out whole splits as Arrow tables (e.g. the feed simulator)."""

    def table(self, split: str) -> pa.Table: ...


class ImpressionDataModule(L.LightningDataModule):
    def __init__(
        self,
        *,
        categorical: Mapping[str, int],
        dense: Sequence[str],
        behaviours: Mapping[str, str],
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
    ) -> None:
        super().__init__()
        self.spec = FeatureSpec(
            categorical=dict(categorical),
            dense=list(dense),
            behaviours=dict(behaviours),
            group_key=group_key,
            oracle=dict(oracle or {}),
            oracle_positive=dict(oracle_positive or {}),
        )
        self.urls = {"train": train, "val": val, "test": test}
        if simulator is None:
            for split, url in self.urls.items():
                if not url:
                    raise DataError(f"data.{split} is not set: give a file, folder, glob or URL")
        self.simulator = simulator
        self.table_format = TableFormat(format, delimiter, header, tuple(column_names))
        self.storage_options = dict(storage_options or {})
        if batch_size < 1 or eval_batch_size < 1:
            raise DataError("data.batch_size and data.eval_batch_size must be >= 1")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.tables: dict[str, Batch] = {}
        self.stats: TrainStats | None = None
        self.weight_mean = 1.0

    def describe(self, split: str) -> str:
        if self.simulator is not None:
            return f"simulated {split} split"
        return f"data.{split} ({self.urls[split]})"

    def prepare(self, scheme: WeightScheme) -> TrainStats:
        """Read and check every split, compute the training statistics, check the scheme's
        weights on the training data. Runs on every rank, before the trainer writes anything."""
        scheme.check_behaviours(self.spec.behaviour_names)
        for split in SPLITS:
            self.tables[split] = self._load(split)
        train = self.tables["train"]
        names = self.spec.behaviour_names
        scheme.check_values(train.behaviours, names, self.describe("train"))
        self.stats = TrainStats.of(train, names)
        self.weight_mean = float(scheme.weights(train.behaviours, names).double().mean())
        if self.weight_mean <= 0:
            raise DataError(
                f"{scheme.describe()}: every training weight is 0 on {self.describe('train')}; "
                "nothing would be learned"
            )
        return self.stats

    def _load(self, split: str) -> Batch:
        if self.simulator is not None:
            return featurize(self.simulator.table(split), self.spec, self.describe(split))
        files = expand(self.urls[split], self.storage_options)
        parts = [
            featurize(
                read_table(url, self.spec.columns, self.table_format, self.storage_options),
                self.spec,
                url,
            )
            for url in files
        ]
        return Batch.concat(parts)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> TrainBatches:
        rank, world = self._rank()
        return TrainBatches(self.tables["train"], self.batch_size, self.seed, rank, world)

    def val_dataloader(self) -> EvalBatches:
        return EvalBatches(self.tables["val"], self.eval_batch_size, *self._rank())

    def test_dataloader(self) -> EvalBatches:
        return EvalBatches(self.tables["test"], self.eval_batch_size, *self._rank())
