"""Streaming vs in-memory data on the training job's benchmark workload.

1. Throughput: rows/s of the job's training step (RankingModule: DNN, SparseDenseAdam,
   weighted BCE with the `seed` scheme, under lightning.Trainer, as bench/throughput.py runs
   it) fed from memory (`data.mode=memory`) and streamed from local Parquet by DataLoader
   workers (`data.mode=stream`), on the 2,000,000-row simulated workload
   (`python -m train.data.synthetic OUT --rows 2000000 --shards 8`), same number of steps,
   the two modes alternating round by round. The headline ratio comes from the time each step
   waits for its batch (the only part that differs; steady on a shared machine); the
   wall-clock ratio of paired rounds is printed beside it with its range.
2. Memory: peak resident memory of the whole process tree (trainer process, forkserver,
   workers; RSS summed, and PSS, which counts shared pages once) while streaming every row of
   a 20,000,000-row training split, against the same at 2,000,000 rows (flat = bounded).
   The 20M rows are written shard by shard, never held in memory.

    python bench/stream.py [--workdir /tmp/upweight-bench] [--workers 2] [--rounds 5]

The two figures are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
        command = ["-m", "train.data.synthetic", str(folder), "--rows", str(rows)]
        subprocess.run(
            [sys.executable, *command, "--shards", str(shards)],
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
        pq.write_table(table, f"{path}.tmp")  # default row groups, as the job's generator
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


class _StepClock:
    """Times training steps `warmup` .. end of epoch (skips start-up: worker starts, first
    allocations), counting the rows they trained on; also splits each step's wall time into the
    step itself (batch start -> end) and the wait before it (fetching the batch, hooks)."""

    def __init__(self, warmup: int, last: int) -> None:
        import lightning as L

        clock = self

        class Callback(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, index) -> None:
                now = time.perf_counter()
                if index == warmup:
                    clock.begin, clock.rows, clock.wait, clock.step = now, 0, 0.0, 0.0
                    clock.cpu = -_tree_cpu()
                elif index > warmup:
                    clock.wait += now - clock.last
                clock.started = now
                clock.rows += len(batch)

            def on_train_batch_end(self, trainer, module, outputs, batch, index) -> None:
                clock.last = time.perf_counter()
                clock.step += clock.last - clock.started
                if index == last:  # while the workers are still alive
                    clock.cpu += _tree_cpu()

            def on_train_epoch_end(self, trainer, module) -> None:
                clock.end = time.perf_counter()

        self.callback = Callback()
        self.begin = self.end = self.started = self.last = self.wait = self.step = 0.0
        self.cpu = 0.0
        """CPU seconds of the whole process tree (trainer, workers) over the timed steps."""
        self.rows = 0

    @property
    def rate(self) -> float:
        return self.rows / (self.end - self.begin)


def throughput(
    folder: Path, workers: int, steps: int, warmup: int, rounds: int
) -> dict[str, list[_StepClock]]:
    """Rows/s of the job's own training step (RankingModule under lightning.Trainer, as
    bench/throughput.py runs it) fed by each mode, over the same number of steps. The modes
    alternate for `rounds` rounds, so both see the same machine load (on a shared machine a
    single long run of each mostly measures the neighbours)."""
    import torch
    from throughput import job_module, job_trainer

    scheme = seed_scheme()
    modules = {}
    for mode in ("memory", "stream"):
        data = data_module(folder, mode, workers if mode == "stream" else 0)
        started = time.perf_counter()
        data.prepare(scheme)
        print(f"{mode:>6}: prepared in {time.perf_counter() - started:.1f} s", flush=True)
        modules[mode] = data
    clocks: dict[str, list[_StepClock]] = {"memory": [], "stream": []}
    for round_ in range(rounds):
        for mode, data in modules.items():
            torch.manual_seed(round_)
            module = job_module(data, scheme)
            clock = _StepClock(warmup, warmup + steps - 1)
            trainer = job_trainer(limit_train_batches=warmup + steps, callbacks=[clock.callback])
            trainer.fit(module, datamodule=data)
            clocks[mode].append(clock)
        line = ", ".join(
            f"{mode} {c[-1].rate:>7,.0f} rows/s (step {1e3 * c[-1].step / steps:4.0f} ms, "
            f"wait {1e3 * c[-1].wait / (steps - 1):4.1f} ms, CPU {1e3 * c[-1].cpu / steps:4.0f} ms)"
            for mode, c in clocks.items()
        )
        print(f"round {round_ + 1}: {line}", flush=True)
    return clocks


def seed_scheme():
    """`weights=seed` (click 1, finish 3, long watch 5), as bench/throughput.py trains."""
    from train.weights import build_scheme

    return build_scheme(
        label="click",
        terms=[
            {"behaviour": "click", "coef": 1},
            {"behaviour": "finish", "coef": 3},
            {"behaviour": "watch_time", "coef": 5, "transform": "threshold", "threshold": 30},
        ],
        name="seed",
    )


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


def _tree_cpu() -> float:
    """CPU seconds (user + system) used so far by this process and its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _tree(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / ticks


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
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            totals = [_memory(p) for p in _tree(os.getpid())]
            if sum(r for r, _ in totals) > self.rss:
                self.rss, self.processes = sum(r for r, _ in totals), len(totals)
            self.pss = max(self.pss, sum(p for _, p in totals))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stream_all(folder: Path, train: Path, workers: int) -> dict[str, float]:
    """Prepare (the streamed statistics pass) and stream one epoch of every training row, in
    this (fresh) process, measuring its process tree."""
    from train.weights import build_scheme

    with PeakMemory() as peak:
        started = time.perf_counter()
        data = data_module(folder, "stream", workers, train=train)
        data.prepare(build_scheme(label="click"))
        rows = sum(len(b) for b in data.train_dataloader())
        seconds = time.perf_counter() - started
    return {
        "rows": rows,
        "seconds": seconds,
        "rss": peak.rss,
        "pss": peak.pss,
        "processes": peak.processes,
    }


def measure_in_subprocess(folder: Path, train: Path, workers: int) -> dict[str, float]:
    """`stream_all` in a fresh interpreter, so nothing of the throughput runs is counted."""
    options = ["--measure", str(train), "--feed", str(folder), "--workers", str(workers)]
    done = subprocess.run(
        [sys.executable, __file__, *options],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/upweight-bench")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--big-rows", type=int, default=20_000_000)
    parser.add_argument("--workers", type=int, default=2, help="stream DataLoader workers")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per mode per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="alternations memory/stream")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one memory run
    parser.add_argument("--feed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(stream_all(Path(args.feed), Path(args.measure), args.workers)))
        return
    work = Path(args.workdir)
    import torch

    print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, workers {args.workers}")
    folder = workload(work / f"feed-{args.rows}", args.rows, 8)

    clocks = throughput(folder, args.workers, args.steps, args.warmup, args.rounds)
    # The same step fed by either mode: what differs is the wait for each batch (the data path)
    # and the CPU the readers take. On a shared machine the neighbours' load swings the step
    # time itself several-fold from round to round, so the wall-clock ratio of paired rounds is
    # reported beside the data-path ratio, with its range.
    wait = {
        mode: statistics.median(1e3 * c.wait / (args.steps - 1) for c in runs)
        for mode, runs in clocks.items()
    }
    cpu = {
        mode: statistics.median(1e3 * c.cpu / args.steps for c in runs)
        for mode, runs in clocks.items()
    }
    step = statistics.median(1e3 * c.step / args.steps for runs in clocks.values() for c in runs)
    ratio = (step + wait["memory"]) / (step + wait["stream"])
    paired = sorted(
        s.rate / m.rate for s, m in zip(clocks["stream"], clocks["memory"], strict=True)
    )

    print(f"writing {args.big_rows:,} training rows (once) ...", flush=True)
    big = big_train_split(work / f"train-{args.big_rows}", args.big_rows, 1_000_000)
    small = work / "train-small"
    small.mkdir(exist_ok=True)
    for shard in sorted(big.glob("part-*.parquet"))[: max(1, args.rows // 1_000_000)]:
        if not (small / shard.name).exists():
            os.symlink(shard, small / shard.name)
    runs = {}
    for label, train in (("small", small), ("big", big)):
        run = runs[label] = measure_in_subprocess(folder, train, args.workers)
        print(
            f"streamed {run['rows']:>11,} rows in {run['seconds']:6.1f} s "
            f"({run['rows'] / run['seconds']:,.0f} rows/s, data path only): peak RSS "
            f"{run['rss'] / GIB:.2f} GiB summed over {run['processes']} processes, PSS "
            f"{run['pss'] / GIB:.2f} GiB",
            flush=True,
        )
    small_run, big_run = runs["small"], runs["big"]
    print()
    print(
        f"stream/memory training rows/s: {ratio:.2f}x from the data path (wait for data "
        f"{wait['stream']:.1f} vs {wait['memory']:.1f} ms per {step:.0f} ms step; CPU per step "
        f"{cpu['stream']:.0f} vs {cpu['memory']:.0f} ms), wall clock "
        f"{statistics.median(paired):.2f}x (median of {len(paired)} paired rounds, range "
        f"{paired[0]:.2f}-{paired[-1]:.2f}); target >= 0.9x"
    )
    print(
        f"peak RSS streaming {big_run['rows']:,} rows: {big_run['rss'] / GIB:.2f} GiB "
        f"(PSS {big_run['pss'] / GIB:.2f} GiB; {small_run['rows']:,} rows: "
        f"{small_run['rss'] / GIB:.2f} GiB; target < 2 GiB, flat)"
    )


if __name__ == "__main__":
    main()
