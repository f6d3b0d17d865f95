"""Streaming vs in-memory data on the training job's benchmark workload.

1. Throughput: rows/s of the training step (the job's DNN, SparseDenseAdam, weighted BCE, dense
   fill + standardisation as in RankingModule) fed from memory (`data.mode=memory`) and
   streamed from local Parquet by DataLoader workers (`data.mode=stream`), on the 2,000,000-row
   simulated workload (`python -m train.data.synthetic OUT --rows 2000000 --shards 8`).
2. Memory: peak resident memory of the whole process tree (trainer process, forkserver,
   workers; RSS summed, and PSS, which counts shared pages once) while streaming every row of
   a 20,000,000-row training split, against the same at 2,000,000 rows (flat = bounded).
   The 20M rows are written shard by shard, never held in memory.

    python bench/stream.py [--workdir /tmp/upweight-bench] [--workers 2] [--steps 200]

The two figures are printed last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1 << 30
SYNTHETIC = {
    "categorical": {
        "user_id": 50000,
        "video_id": 100000,
        "author_id": 10000,
        "category": 100,
        "hour": 24,
        "device": 10,
    },
    "dense": ["video_len_s", "user_activity", "video_age_days", "author_followers_log"],
    "behaviours": {"click": "click", "finish": "finish", "watch_time": "watch_s", "like": "like"},
    "group_key": "user_id",
}


def workload(folder: Path, rows: int, shards: int) -> Path:
    """The benchmark workload, written once by the job's own generator."""
    if not (folder / "train").is_dir():
        subprocess.run(
            [sys.executable, "-m", "train.data.synthetic", str(folder), "--rows", str(rows)]
            + ["--shards", str(shards)],
            check=True,
            cwd=ROOT,
        )
    return folder


def big_train_split(folder: Path, rows: int, shard_rows: int) -> Path:
    """`rows` training rows as shards of `shard_rows`, each simulated and written on its own
    (different seeds), so generating never holds more than one shard."""
    import pyarrow.parquet as pq

    from train.data.synthetic import FeedSimulator

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(-(-rows // shard_rows)):
        path = folder / f"part-{i:05d}.parquet"
        if path.exists():
            continue
        n = min(shard_rows, rows - i * shard_rows)
        table = FeedSimulator(n_train=n, n_val=1, n_test=1, seed=i).table("train")
        pq.write_table(table, f"{path}.tmp", row_group_size=128 * 1024)
        os.replace(f"{path}.tmp", path)
        print(f"  wrote {path.name} ({n} rows)", flush=True)
    return folder


def data_module(folder: Path, mode: str, workers: int, train: Path | None = None):
    from train.data.module import ImpressionDataModule

    return ImpressionDataModule(
        train=str(train or folder / "train"),
        val=str(folder / "val"),
        test=str(folder / "test"),
        mode=mode,
        num_workers=workers,
        **SYNTHETIC,
    )


def throughput(folder: Path, workers: int, steps: int, warmup: int) -> dict[str, float]:
    import torch

    from train.model import DNN
    from train.module import RankingModule, weighted_bce
    from train.optim import SparseDenseAdam
    from train.weights import build_scheme

    scheme = build_scheme(label="click")
    rates = {}
    for mode in ("memory", "stream"):
        data = data_module(folder, mode, workers if mode == "stream" else 0)
        started = time.perf_counter()
        stats = data.prepare(scheme)
        prepared = time.perf_counter() - started
        torch.manual_seed(0)
        network = DNN(data.spec.cardinalities, len(data.spec.dense))
        module = RankingModule(
            network,
            scheme,
            behaviours=data.spec.behaviour_names,
            continuous=stats.continuous,
            dense_mean=stats.dense_mean,
            dense_std=stats.dense_std,
            optimizer=SparseDenseAdam,
        )
        optimizer = SparseDenseAdam(network)
        names = data.spec.behaviour_names
        label = names.index(scheme.label)
        batches = iter(data.train_dataloader())
        rows = 0
        for step in range(warmup + steps):
            if step == warmup:
                rows, begin = 0, time.perf_counter()
            batch = next(batches)
            logits = module(batch.categorical, batch.dense)
            weight = scheme.weights(batch.behaviours, names)
            target = (batch.behaviours[:, label] > 0).float()
            loss = weighted_bce(logits, target, weight, weight.sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rows += len(batch)
        rates[mode] = rows / (time.perf_counter() - begin)
        batches.close()
        print(
            f"{mode:>6}: {rates[mode]:>9,.0f} rows/s over {steps} steps of {data.batch_size} "
            f"(prepare {prepared:.1f} s)",
            flush=True,
        )
    return rates


def _tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


class PeakMemory:
    """Samples the process tree every `interval` seconds; keeps the peak RSS and PSS sums."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            totals = [_memory(p) for p in _tree(os.getpid())]
            self.rss = max(self.rss, sum(r for r, _ in totals))
            self.pss = max(self.pss, sum(p for _, p in totals))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stream_all(folder: Path, train: Path, workers: int) -> tuple[int, float, PeakMemory]:
    """Prepare (the streamed statistics pass) and stream one epoch of every training row."""
    from train.weights import build_scheme

    with PeakMemory() as peak:
        started = time.perf_counter()
        data = data_module(folder, "stream", workers, train=train)
        data.prepare(build_scheme(label="click"))
        rows = sum(len(b) for b in data.train_dataloader())
        seconds = time.perf_counter() - started
    return rows, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/upweight-bench")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--big-rows", type=int, default=20_000_000)
    parser.add_argument("--workers", type=int, default=2, help="stream DataLoader workers")
    parser.add_argument("--steps", type=int, default=200, help="timed training steps per mode")
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    work = Path(args.workdir)
    import torch

    print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, workers {args.workers}")
    folder = workload(work / f"feed-{args.rows}", args.rows, 8)

    rates = throughput(folder, args.workers, args.steps, args.warmup)
    ratio = rates["stream"] / rates["memory"]

    print(f"writing {args.big_rows:,} training rows (once) ...", flush=True)
    big = big_train_split(work / f"train-{args.big_rows}", args.big_rows, 1_000_000)
    small = work / "train-small"
    small.mkdir(exist_ok=True)
    for shard in sorted(big.glob("part-*.parquet"))[: max(1, args.rows // 1_000_000)]:
        if not (small / shard.name).exists():
            os.symlink(shard, small / shard.name)
    memory = {}
    for label, train in (("small", small), ("big", big)):
        rows, seconds, peak = stream_all(folder, train, args.workers)
        memory[label] = (rows, peak)
        print(
            f"streamed {rows:>11,} rows in {seconds:6.1f} s ({rows / seconds:,.0f} rows/s data "
            f"path only): peak RSS {peak.rss / GIB:.2f} GiB, PSS {peak.pss / GIB:.2f} GiB",
            flush=True,
        )
    (small_rows, small_peak), (big_rows, big_peak) = memory["small"], memory["big"]
    print()
    print(
        f"stream/memory training rows/s: {ratio:.2f}x "
        f"({rates['stream']:,.0f} vs {rates['memory']:,.0f} rows/s; target >= 0.9x)"
    )
    print(
        f"peak RSS streaming {big_rows:,} rows: {big_peak.rss / GIB:.2f} GiB "
        f"(PSS {big_peak.pss / GIB:.2f} GiB; {small_rows:,} rows: {small_peak.rss / GIB:.2f} GiB; "
        "target < 2 GiB, flat)"
    )


if __name__ == "__main__":
    main()
