"""Training throughput with the dense tower compiled (`compile=tower`) vs eager.

    python bench/compile.py [--rows 1000000] [--threads 2] [--repeats 3] [--mode default]

The bench workload of bench/throughput.py (8 hashed categorical features, 4 dense, embedding
16, MLP 256-128-64, batch 4096, the `seed` scheme, sparse embeddings + SparseDenseAdam) through
the job's path: ImpressionDataModule + RankingModule + lightning.Trainer, 2 epochs per run. The
second epoch gives rows/s (compiled code by then); the first epoch's extra time over the second
is the compilation. The arms alternate (eager, compiled, compiled, eager, ...) so that a load
from other jobs falls on both. Prints one row per run, the medians and, last,
`ratio <compiled/eager>` of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from throughput import data_module, job_module, job_trainer

from train.compile import CompileTower


class EpochTimes(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)


def run(data, compiled: bool, mode: str, dynamic: bool | None) -> tuple[float, float, int]:
    """(rows/s of the second epoch, first epoch's extra seconds, graphs compiled)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    timer = EpochTimes()
    callbacks: list[L.Callback] = [timer]
    if compiled:
        callbacks.append(CompileTower(mode=mode, dynamic=dynamic))
    job_trainer(max_epochs=2, callbacks=callbacks).fit(job_module(data), datamodule=data)
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    first, second = timer.times
    return len(data.tables["train"]) / second, first - second, graphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default="default")
    parser.add_argument("--dynamic", choices=("null", "true", "false"), default="null")
    args = parser.parse_args()
    dynamic = {"null": None, "true": True, "false": False}[args.dynamic]
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    data = data_module(args.rows, scale=1)
    print(f"data: {args.rows:,} rows featurised in {time.perf_counter() - start:.1f} s")
    rates: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(args.repeats):
        # ABBA: each arm runs first in half of the pairs.
        for compiled in (False, True) if repeat % 2 == 0 else (True, False):
            rate, extra, graphs = run(data, compiled, args.mode, dynamic)
            rates[compiled].append(rate)
            name = f"compiled ({args.mode}, dynamic={args.dynamic})" if compiled else "eager"
            note = f"  compile {extra:5.1f} s, {graphs} graphs" if compiled else ""
            print(f"{repeat}  {name:<42} {rate:>10,.0f} rows/s{note}", flush=True)
    eager, compiled = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"median eager    {eager:>10,.0f} rows/s")
    print(f"median compiled {compiled:>10,.0f} rows/s")
    print(f"ratio {compiled / eager:.3f}")


if __name__ == "__main__":
    main()
