"""Peak memory of the statistics pass that builds exact vocabularies, on a split too large to
hold as Python objects.

    python bench/vocabulary.py [--rows 20000000] [--users 10000000] [--items 1000000]

Writes `--rows` impressions as Parquet shards (a temporary folder): a heavy-tailed int64 user
id over `--users` distinct values, a string item id over `--items`, a click. Then, in a fresh
process, `ImpressionDataModule(categorical=[user, item], mode=stream).prepare()`: the id pass
(vocabularies of both columns) and the statistics scan, as a training job runs them. Prints the
process's peak RSS (ru_maxrss) after the imports alone (the baseline) and after prepare(), the
vocabulary sizes, the wall time, and `peak_gib <x>` against the 2 GiB goal.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SHARD_ROWS = 2_000_000
GIB = 1 << 30


def write_split(folder: Path, rows: int, users: int, items: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        # Heavy-tailed: a few users are most rows, most users are seen once or twice.
        user = (rng.pareto(1.2, n) * users / 20).astype(np.int64) % users
        item = pc.binary_join_element_wise(
            "i", pc.cast(pa.array(rng.integers(0, items, n)), pa.string()), ""
        )
        click = rng.integers(0, 2, n).astype(np.int8)
        pq.write_table(
            pa.table({"user": user, "item": item, "click": click}),
            folder / f"part-{i:04d}.parquet",
            row_group_size=500_000,
        )


def measure(folder: str) -> None:
    """Runs in a fresh process: the peak RSS of the imports, then of the statistics pass."""
    from train.data.module import ImpressionDataModule
    from train.weights import build_scheme

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    data = ImpressionDataModule(
        categorical=["user", "item"],
        dense=[],
        behaviours={"click": "click"},
        group_key="user",
        train=f"{folder}/train",
        val=f"{folder}/small",
        test=f"{folder}/small",
        mode="stream",
    )
    start = time.perf_counter()
    stats = data.prepare(build_scheme(label="click"))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"rows {stats.rows}  prepare {seconds:.1f} s")
    for table, summary in stats.ids.items():
        print(f"{table}: {summary}")
    print(f"rss after imports {baseline / GIB:.2f} GiB, peak after prepare {peak / GIB:.2f} GiB")
    print(f"peak_gib {peak / GIB:.2f} (goal < 2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--users", type=int, default=10_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_split(Path(folder) / "train", args.rows, args.users, args.items, seed=0)
        write_split(Path(folder) / "small", 1000, args.users, args.items, seed=1)
        print(f"wrote {args.rows} rows in {time.perf_counter() - start:.1f} s", flush=True)
        subprocess.run(
            [sys.executable, __file__, "--measure", folder], check=True, cwd=Path(__file__).parent
        )


if __name__ == "__main__":
    main()
