"""DDP on the CPU: 1 process vs 2 on the benchmark workload, and the bytes all-reduced per step.

    python bench/ddp.py [--rows 500000] [--cores 2]

The workload of bench/throughput.py (simulated rows, 8 hashed categorical features, 4 dense,
embedding 16, MLP 256-128-64, the `seed` scheme) through the job's own path
(ImpressionDataModule + RankingModule + lightning.Trainer), one epoch at a global batch of
4096: 1 process with `--cores` threads (and with 1, a control), then 2 DDP processes (gloo,
launched by torchrun) with `--cores / 2` threads each, the same global batches. A DDP communication hook, the
job's own (`train.sparse_allreduce.reduce_gradients`), counts the gradient bytes each rank hands
to the reduction per step, with sparse embedding gradients (the default: only the rows a batch
touched) and with dense ones (the whole table).
Throughput is timed after 5 warm-up steps. Prints rows/s, bytes per step and, last,
`ratio <2 processes rows/s / the better single process>` (sparse gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from throughput import BATCH, data_module, job_module, job_trainer

from train.sparse_allreduce import reduce_gradients

WARMUP = 5


class ByteCount:
    """State of `counting_hook`: gradient bytes handed to all-reduce, summed over steps."""

    def __init__(self) -> None:
        self.bytes = 0


def counting_hook(state, bucket):  # unannotated: DDP checks annotations against real types
    """The job's reduction (dense collectives only, see train/sparse_allreduce.py), counting
    what it is handed: a sparse gradient is its values and indices (the touched rows), a dense
    bucket its whole flat buffer."""
    grad = bucket.buffer()
    if grad.is_sparse:
        state.bytes += grad._values().nbytes + grad._indices().nbytes
    else:
        state.bytes += grad.nbytes
    return reduce_gradients(torch.distributed.group.WORLD, bucket)


class Clock(L.Callback):
    """Wall time of the training steps after the warm-up; with several processes, registers
    the byte-counting hook (Lightning's `ddp_comm_hook` only does that on CUDA)."""

    def __init__(self, count: ByteCount) -> None:
        self.count = count
        self.start = 0.0
        self.seconds = 0.0
        self.steps = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            trainer.strategy.model.register_comm_hook(self.count, counting_hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == WARMUP:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.global_step - WARMUP


def worker(rows: int, threads: int, sparse: bool, out: str) -> None:
    """One rank (or the only process): train one epoch, rank 0 writes its figures to `out`."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = data_module(rows, scale=1)
    data.batch_size = BATCH // world  # the same global batches whatever the process count
    module = job_module(data, sparse=sparse)
    count = ByteCount()
    clock = Clock(count)
    trainer = job_trainer(
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        num_nodes=1,
        strategy="ddp" if world > 1 else "auto",
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=data)
    if trainer.is_global_zero:
        Path(out).write_text(
            json.dumps(
                {
                    "rows_per_s": clock.steps * BATCH / clock.seconds,
                    "bytes_per_step": count.bytes / max(trainer.global_step, 1),
                    "steps": trainer.global_step,
                    "world": world,
                }
            )
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch(processes: int, rows: int, threads: int, sparse: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/result.json"
        args = [__file__, "--worker", f"--rows={rows}", f"--threads={threads}", f"--out={out}"]
        args += ["--sparse"] if sparse else []
        if processes == 1:
            command = [sys.executable, *args]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += [f"--nproc-per-node={processes}", *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sparse", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.rows, args.threads, args.sparse, args.out)
        return

    half = max(1, args.cores // 2)
    print(f"{args.rows:,} rows, one epoch at a global batch of {BATCH}, {args.cores} cores")
    one = launch(1, args.rows, args.cores, sparse=True)
    print(f"1 process  x {args.cores} threads, sparse:  {one['rows_per_s']:>10,.0f} rows/s")
    if args.cores > 1:  # OpenMP threads lose most on a busy machine: the 1-thread control
        single = launch(1, args.rows, 1, sparse=True)
        print(f"1 process  x 1 thread,  sparse:  {single['rows_per_s']:>10,.0f} rows/s")
    two = launch(2, args.rows, half, sparse=True)
    print(
        f"2 processes x {half} thread,  sparse:  {two['rows_per_s']:>10,.0f} rows/s"
        f"   all-reduce {two['bytes_per_step'] / 1e6:6.2f} MB/step/rank"
    )
    dense = launch(2, args.rows, half, sparse=False)
    print(
        f"2 processes x {half} thread,  dense:   {dense['rows_per_s']:>10,.0f} rows/s"
        f"   all-reduce {dense['bytes_per_step'] / 1e6:6.2f} MB/step/rank"
        f"  ({dense['bytes_per_step'] / two['bytes_per_step']:.1f}x the sparse bytes)"
    )
    best = max(one["rows_per_s"], single["rows_per_s"]) if args.cores > 1 else one["rows_per_s"]
    print(f"ratio {two['rows_per_s'] / best:.2f}")


if __name__ == "__main__":
    main()
