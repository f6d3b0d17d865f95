"""Sharded tables (`sharding=torchrec`) vs replicated DDP: memory per rank and rows/s, 2 processes.

    python bench/sharding.py [--scale 50] [--rows 300000] [--plan table_wise]

The job itself (`python -m train`, 2 CPU processes over gloo, one thread each, global batch 4096)
on the simulated feed with its 6 id columns hashed into `--scale` × the buckets of
bench/throughput.py's workload (user 100k, video 50k, author 10k, category, hour, device), once
replicated (`sharding=none`: whole tables, sparse gradients, the default SparseDenseAdam) and
once sharded (`sharding=torchrec`, its default row-wise Adagrad, or `--optimizer adagrad`: a
state value per weight; `--plan row_wise` shards the user and video tables by rows instead of
whole tables). A probe callback records each rank's
peak RSS and the training rows/s after 5 warm-up steps. Prints both arms, then
`memory ratio <sharded / replicated peak RSS, the larger rank of each>` and
`throughput ratio <sharded / replicated rows/s>`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = {
    "user_id": 100_000,
    "video_id": 50_000,
    "author_id": 10_000,
    "category": 1_000,
    "hour": 100,
    "device": 10,
}
WARMUP = 5


class Probe(L.Callback):
    """Each rank's peak RSS and its training rows/s after the warm-up, into `<run>/probe_<rank>.json`."""

    def __init__(self) -> None:
        self.start = 0.0
        self.rows = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, *_: Any) -> None:
        if trainer.global_step == WARMUP:
            self.start, self.rows = time.perf_counter(), 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, *_: Any
    ) -> None:
        if trainer.global_step > WARMUP:
            self.rows += len(batch)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        seconds = time.perf_counter() - self.start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        path = Path(trainer.default_root_dir) / f"probe_{trainer.global_rank}.json"
        path.write_text(json.dumps({"rows_per_s": self.rows / seconds, "peak_rss": peak}))


def run(arm: str, overrides: list[str], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    categorical = ", ".join(f"{k}: {v * args.scale}" for k, v in BUCKETS.items())
    command = [
        sys.executable, "-m", "train",
        "hardware=cpu", "hardware.devices=2", "logger=csv", "trainer.enable_progress_bar=false",
        f"data.simulator.n_train={args.rows}", "data.simulator.n_val=2000",
        "data.simulator.n_test=2000", f"data.categorical=[{{{categorical}}}]",
        "data.batch_size=2048", "trainer.max_epochs=1", "weights=seed", "xauc_pairs=1000",
        # Checkpoints of GB-sized replicated tables would time the disk, not the step.
        "callbacks.checkpoint=null", "callbacks.last=null", "callbacks.first_epoch=null",
        "callbacks.early_stopping=null",
        "+callbacks.probe._target_=sharding.Probe",
        f"paths.output_dir={out / arm}", *overrides,
    ]  # fmt: skip
    env = os.environ | {
        "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT}",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{arm} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads((out / arm / f"probe_{r}.json").read_text()) for r in (0, 1)]
    return {
        "rows_per_s": sum(r["rows_per_s"] for r in ranks),
        "peak_rss": [r["peak_rss"] for r in ranks],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--plan", choices=("table_wise", "row_wise"), default="table_wise")
    parser.add_argument(
        "--optimizer", default="rowwise_adagrad", help="the sharded arm's sharding.optimizer"
    )
    args = parser.parse_args()
    table_mib = sum(BUCKETS.values()) * args.scale * 16 * 4 / 2**20
    print(f"tables: {sum(BUCKETS.values()) * args.scale:,} rows x 16 = {table_mib:,.0f} MiB")
    sharded = ["sharding=torchrec", f"sharding.optimizer={args.optimizer}"]
    if args.plan == "row_wise":
        sharded.append("sharding.plan={user_id: row_wise, video_id: row_wise}")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        arms = {
            "replicated": run("replicated", [], out, args),
            f"sharded ({args.plan})": run("sharded", sharded, out, args),
        }
    for arm, figures in arms.items():
        rss = ", ".join(f"{b / 2**20:,.0f}" for b in figures["peak_rss"])
        print(f"{arm:<24} {figures['rows_per_s']:>10,.0f} rows/s   peak RSS per rank: {rss} MiB")
    replicated, sharded_figures = arms["replicated"], arms[f"sharded ({args.plan})"]
    memory = max(sharded_figures["peak_rss"]) / max(replicated["peak_rss"])
    print(f"memory ratio {memory:.2f}")
    print(f"throughput ratio {sharded_figures['rows_per_s'] / replicated['rows_per_s']:.2f}")


if __name__ == "__main__":
    main()
