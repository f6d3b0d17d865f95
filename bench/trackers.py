"""What an experiment tracker adds to a run: one-epoch runs with `logger=csv` and with
`logger=[csv,mlflow]` against an `mlflow server` on loopback (started here: sqlite store,
artifacts in a temporary folder), alternating, in this one process.

    python bench/trackers.py [--rows 1200000] [--repeats 3] [--tracker mlflow|wandb]

Each timed run is the whole job (`train.__main__.train`: data, fit, best.ckpt's evaluation,
test, metrics.json, the tracker's final logging) on a simulated feed of `--rows` training rows
(1.2M: ~27 s on one thread of a 2-core machine); size it so that a run takes 20-40 s, or the
fixed costs dominate. One untimed run of each kind first: imports (mlflow's takes seconds,
once per process, and is printed) and the simulator's caches. `--tracker wandb` runs W&B in offline mode instead (no server, no network). Prints each
run's wall and CPU seconds (this process's: a loaded machine moves wall times more than CPU
times), the medians and, last, `ratio <tracked / csv median wall time>`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One thread, set before torch is imported: on a shared machine two spinning OpenMP threads
# make CPU and wall times swing by a third from run to run.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.helpers import compose, mlflow_server  # noqa: E402
from train.__main__ import train  # noqa: E402


def run(overrides: list[str], folder: Path) -> tuple[float, float]:
    """Wall and CPU seconds of this process (threads included) for one job."""
    cfg = compose(*overrides, f"paths.output_dir={folder}")
    wall, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tracker", choices=("mlflow", "wandb"), default="mlflow")
    args = parser.parse_args()
    base = [
        "hardware=cpu",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        f"data.simulator.n_train={args.rows}",
        f"data.simulator.n_val={args.rows // 8}",
        f"data.simulator.n_test={args.rows // 8}",
        "data.batch_size=1024",
        "xauc_pairs=100000",
    ]
    kinds = {"csv": ["logger=csv"], args.tracker: [f"logger=[csv,{args.tracker}]"]}
    with (
        tempfile.TemporaryDirectory(prefix="bench-trackers-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        folder = Path(tmp)
        if args.tracker == "mlflow":
            os.environ["MLFLOW_TRACKING_URI"] = stack.enter_context(mlflow_server(folder))
            start = time.perf_counter()
            import mlflow  # noqa: F401

            print(
                f"import mlflow: {time.perf_counter() - start:.1f} s (once per process)", flush=True
            )
        else:
            os.environ["WANDB_MODE"] = "offline"
            os.environ["WANDB_SILENT"] = "true"
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        cpus: dict[str, list[float]] = {kind: [] for kind in kinds}
        for kind, overrides in kinds.items():  # warm-up, untimed: a small feed
            run([*base, *overrides, "data.simulator.n_train=20000"], folder / f"warm-{kind}")
        for i in range(args.repeats):
            for kind, overrides in kinds.items():
                seconds, cpu = run([*base, *overrides], folder / f"{kind}-{i}")
                times[kind].append(seconds)
                cpus[kind].append(cpu)
                print(f"run {i} {kind:>6}: {seconds:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    medians = {kind: statistics.median(t) for kind, t in times.items()}
    for kind, median in medians.items():
        print(f"median {kind:>6}: {median:.2f} s wall, {statistics.median(cpus[kind]):.2f} s CPU")
    pairs = [t / c for t, c in zip(times[args.tracker], times["csv"], strict=True)]
    print("pair ratios " + " ".join(f"{p:.3f}" for p in pairs))
    cpu_ratio = statistics.median(cpus[args.tracker]) / statistics.median(cpus["csv"])
    print(f"cpu ratio {cpu_ratio:.4f} (this process only: not the server's)")
    # Time spent waiting (wall - CPU of this process), per run: the tracker's calls to its
    # server, immune to how fast the shared CPU happens to run during a pair.
    waits = {
        kind: statistics.median(w - c for w, c in zip(times[kind], cpus[kind], strict=True))
        for kind in times
    }
    extra = waits[args.tracker] - waits["csv"]
    print(
        f"waiting: csv {waits['csv']:.3f} s, {args.tracker} {waits[args.tracker]:.3f} s a run: "
        f"+{extra:.3f} s = {100 * extra / medians['csv']:.2f}% of the csv run"
    )
    print(f"ratio {medians[args.tracker] / medians['csv']:.4f}")


if __name__ == "__main__":
    main()
