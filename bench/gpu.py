"""Training throughput on one GPU: the benchmark workload, bf16-mixed, data resident on the GPU.

    python bench/gpu.py [--rows 4000000] [--batch-sizes 4096 65536] [--steps 300]

The workload of bench/throughput.py (simulated rows, 8 hashed categorical features, 4 dense,
embedding 16, MLP 256-128-64, the `seed` scheme) through the job's own path:
ImpressionDataModule + RankingModule + lightning.Trainer(accelerator="gpu", devices=1,
precision="bf16-mixed"), with `data.device=cuda`: the data module moves the loaded tensors to
the GPU once, at the first fit's `setup`, so every batch is sliced there (no host-to-device
copy). For each batch size: a fresh model, 20 warm-up steps, then `--steps` timed steps
(across epochs when the data runs out), with the GPU synchronised at both ends. Target:
>= 10,000,000 rows/s on one H200 at batch 65536. Prints the device, rows/s per batch size and,
last, `ratio <rows/s at the largest / at the smallest batch>`.
With `--sync-check` the timed steps run under `torch.cuda.set_sync_debug_mode("error")`: any
step that makes the GPU wait for the host raises (the steps whose values the logger reads,
every `log_every_n_steps`, are left out, as in tests/test_no_sync.py).
Without CUDA it says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import lightning as L
import torch
from throughput import data_module, job_module, job_trainer

WARMUP = 20


class Clock(L.Callback):
    """GPU-synchronised wall time from the end of the warm-up to the end of training."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.start = 0.0
        self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP and not self.start:
            self.sync()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self.start


class SyncCheck(L.Callback):
    """`set_sync_debug_mode("error")` from a step's start to its end, after the warm-up."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        every = trainer.log_every_n_steps
        if trainer.global_step >= WARMUP and (trainer.global_step + 1) % every:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode(0)


def rows_per_s(
    data, batch_size: int, steps: int, accelerator: str = "gpu", sync_check: bool = False
) -> float:
    data.batch_size = batch_size
    module = job_module(data)
    clock = Clock(torch.cuda.synchronize if accelerator == "gpu" else lambda: None)
    trainer = job_trainer(
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed",
        max_steps=WARMUP + steps,
        max_epochs=-1,
        num_sanity_val_steps=0,
        callbacks=[clock, *([SyncCheck()] if sync_check else [])],
    )
    trainer.fit(module, datamodule=data)
    return steps * batch_size / clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sync-check", action="store_true", help="fail on any host sync")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "no CUDA device: bench/gpu.py measures training on one GPU and cannot run here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False)"
        )
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    print(f"{datetime.date.today()}  python bench/gpu.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16-mixed")

    start = time.perf_counter()
    data = data_module(args.rows, scale=1, device="cuda")  # resident from the first fit on
    print(f"data: {args.rows:,} rows featurised in {time.perf_counter() - start:.1f} s")

    results = {}
    for batch_size in args.batch_sizes:
        results[batch_size] = rows_per_s(data, batch_size, args.steps, sync_check=args.sync_check)
        print(f"batch {batch_size:>6}: {results[batch_size]:>14,.0f} rows/s")
    sizes = sorted(results)
    print(f"ratio {results[sizes[-1]] / results[sizes[0]]:.2f}")


if __name__ == "__main__":
    main()
