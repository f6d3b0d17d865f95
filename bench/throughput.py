"""Training throughput: the job's own path vs a minimal hand-written PyTorch loop.

    python bench/throughput.py [--rows 2000000] [--threads 2]

Both train one epoch on the same in-memory tensors (2,000,000 simulated rows, 8 hashed
categorical features, 4 dense, embedding 16, MLP 256-128-64, batch 4096, the `seed` weight
scheme). The job goes through ImpressionDataModule + RankingModule + lightning.Trainer; the raw
loop slices a random permutation, calls `F.binary_cross_entropy_with_logits(weight=)` and steps
dense Adam. Then the job again with every bucket count x10. Prints rows/s and, last,
`ratio <job/raw>`.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from train.data.module import ImpressionDataModule
from train.data.synthetic import FeedSimulator
from train.model import DNN
from train.module import RankingModule
from train.optim import SparseDenseAdam
from train.weights import build_scheme

BUCKETS = {
    "user_id": 100_000,
    "video_id": 50_000,
    "author_id": 10_000,
    "author_hour": 1_000,
    "category_device": 1_000,
    "category": 100,
    "hour": 100,
    "device": 10,
}
DENSE = ["video_len_s", "user_activity", "video_age_days", "author_followers_log"]
BEHAVIOURS = {"click": "click", "finish": "finish", "watch_time": "watch_s"}
BATCH = 4096


class BenchFeed:
    """The simulated feed plus two crossed id columns, to make the 8 categorical features."""

    def __init__(self, rows: int) -> None:
        self.simulator = FeedSimulator(n_train=rows, n_val=1000, n_test=1000)

    def table(self, split: str) -> pa.Table:
        table = self.simulator.table(split)
        author_hour = pc.add(pc.multiply(table["author_id"], 24), table["hour"])
        category_device = pc.binary_join_element_wise(
            pc.cast(table["category"], pa.string()), table["device"], "/"
        )
        return table.append_column("author_hour", author_hour).append_column(
            "category_device", category_device
        )


def scheme():
    return build_scheme(
        label="click",
        terms=[
            {"behaviour": "click", "coef": 1},
            {"behaviour": "finish", "coef": 3},
            {"behaviour": "watch_time", "coef": 5, "transform": "threshold", "threshold": 30},
        ],
    )


def data_module(rows: int, scale: int, device: str = "auto") -> ImpressionDataModule:
    data = ImpressionDataModule(
        categorical={k: v * scale for k, v in BUCKETS.items()},
        dense=DENSE,
        behaviours=BEHAVIOURS,
        group_key="user_id",
        simulator=BenchFeed(rows),
        batch_size=BATCH,
        device=device,
    )
    data.prepare(scheme())
    return data


def job_module(data: ImpressionDataModule, weights=None, sparse: bool = True) -> RankingModule:
    """The job's LightningModule on `data` (prepared), as the benchmarks train it."""
    assert data.stats is not None, "prepare() the data module first"
    return RankingModule(
        DNN(data.spec.cardinalities, len(data.spec.dense), sparse_embeddings=sparse),
        weights or scheme(),
        data.spec,
        data.stats,
        optimizer=SparseDenseAdam,
    )


def job_trainer(**overrides) -> L.Trainer:
    """A Trainer for one timed epoch: no validation, logging, checkpoints or progress bar."""
    settings = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "limit_val_batches": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
    }
    return L.Trainer(**(settings | overrides))


def job_rows_per_s(data: ImpressionDataModule) -> float:
    module, trainer = job_module(data), job_trainer()
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return len(data.tables["train"]) / (time.perf_counter() - start)


def raw_rows_per_s(data: ImpressionDataModule) -> float:
    """The baseline: what a careful engineer writes by hand in a few lines."""
    table = data.tables["train"]
    categorical, dense = table.categorical, torch.nan_to_num(table.dense)
    dense = (dense - dense.mean(0)) / dense.std(0)
    label = table.behaviours[:, 0]
    weight = scheme().weights(table.behaviours, data.spec.behaviour_names)
    model = DNN(data.spec.cardinalities, len(DENSE), sparse_embeddings=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    order = torch.randperm(len(table))
    for begin in range(0, len(table), BATCH):
        rows = order[begin : begin + BATCH]
        w = weight[rows]
        loss = (
            F.binary_cross_entropy_with_logits(
                model(categorical[rows], dense[rows]), label[rows], weight=w, reduction="sum"
            )
            / w.sum()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(table) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    start = time.perf_counter()
    data = data_module(args.rows, scale=1)
    print(f"data: {args.rows:,} rows featurised in {time.perf_counter() - start:.1f} s")
    raw = raw_rows_per_s(data)
    print(f"raw loop (dense Adam):     {raw:>10,.0f} rows/s")
    job = job_rows_per_s(data)
    print(f"job (buckets x1):          {job:>10,.0f} rows/s")
    del data
    job10 = job_rows_per_s(data_module(args.rows, scale=10))
    print(f"job (buckets x10):         {job10:>10,.0f} rows/s  ({job10 / job - 1:+.1%} vs x1)")
    print(f"ratio {job / raw:.2f}")


if __name__ == "__main__":
    main()
