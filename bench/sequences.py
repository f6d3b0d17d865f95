"""Training throughput with a behaviour sequence against without one, in the same run.

    python bench/sequences.py [--rows 500000] [--max-len 30] [--repeat 3] [--threads 2]
                              [--clock wall|process]

All arms train one epoch of the job's own path (ImpressionDataModule in memory mode +
RankingModule with `model=dnn`'s defaults + lightning.Trainer, batch 4096) on the same simulated
rows with exact vocabularies: `none` reads the six id columns and four dense ones; `mean` adds
the user's last `--max-len` clicked videos (`hist_videos`, sharing `video_id`'s table) pooled by
their mean; `attention` pools them by target attention against the candidate video. Prints the
median rows/s of each arm and, last, `ratio mean/none <x>` (median of the per-repeat ratios;
the goal is >= 0.6). `--clock process` times each arm by the CPU seconds of this process
instead of the wall clock: on a machine shared with other jobs the wall clock measures their
load as much as the arm (use it with `--threads 1`, where no thread spins waiting for another).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from throughput import job_trainer

from train.data.module import ImpressionDataModule
from train.data.synthetic import FeedSimulator
from train.model import DNN
from train.module import RankingModule
from train.optim import SparseDenseAdam
from train.weights import build_scheme

IDS = ["user_id", "video_id", "author_id", "category", "hour", "device"]
DENSE = ["video_len_s", "user_activity", "video_age_days", "author_followers_log"]


def prepared(rows: int, pooling: str | None, max_len: int) -> ImpressionDataModule:
    sequences = {}
    if pooling:
        sequences = {"hist_videos": {"table": "video_id", "max_len": max_len, "pooling": pooling}}
    data = ImpressionDataModule(
        categorical=IDS,
        dense=DENSE,
        behaviours={"click": "click"},
        group_key="user_id",
        simulator=FeedSimulator(n_train=rows, n_val=1000, n_test=1000),
        batch_size=4096,
        sequences=sequences,
    )
    data.prepare(build_scheme(label="click"))
    return data


def rows_per_s(data: ImpressionDataModule, clock: str = "wall") -> float:
    spec, stats = data.spec, data.stats
    assert stats is not None
    network = DNN(spec.cardinalities, len(spec.dense), **spec.network_options)
    module = RankingModule(
        network, build_scheme(label="click"), spec, stats, optimizer=SparseDenseAdam
    )
    trainer = job_trainer()
    now = time.process_time if clock == "process" else time.perf_counter
    start = now()
    trainer.fit(module, datamodule=data)
    return len(data.tables["train"]) / (now() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--max-len", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arms = {
        name: prepared(args.rows, name if name != "none" else None, args.max_len)
        for name in ("none", "mean", "attention")
    }
    figures: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeat):
        for name, data in arms.items():
            figures[name].append(rows_per_s(data, args.clock))
            print(f"repeat {repeat} {name}: {figures[name][-1]:,.0f} rows/s", file=sys.stderr)
    for name, values in figures.items():
        print(f"{name:<10} {statistics.median(values):>10,.0f} rows/s")
    ratios = [m / n for m, n in zip(figures["mean"], figures["none"], strict=True)]
    attention = [a / n for a, n in zip(figures["attention"], figures["none"], strict=True)]
    print(f"ratio attention/none {statistics.median(attention):.2f}")
    print(f"ratio mean/none {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
