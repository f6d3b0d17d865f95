"""Warm-started re-weighting vs from-scratch runs of the same scheme, on simulated data.

    python bench/warmstart.py [--rows 200000] [--out DIR] [--fraction 0.3333] [--tolerance 0.005]
                              [--warm-lr 0.003] [--warmup-steps 8] [--seed 0]
                              [--start first_epoch|best]
                              [--source "weights=click_only"] [--target "weights=seed"]
                              [--short "optimizer.embedding_lr=0"]

Four real `python -m train` runs on the same simulated feed (seeded: the same rows every time):

1. the source scheme from scratch, to convergence (early stopping on the monitored metric);
2. the target scheme from scratch, to convergence: the reference, and its step count S;
3. the target scheme with `init_from=<1's first_epoch.ckpt>` (the model every run keeps after
   its first epoch; `--start best` takes the converged one, a worse start: see the README's
   "Warm-started re-weighting") for a fixed budget of `fraction` x S
   steps (max_steps), the final weights kept: no early stopping, since re-weighting lowers the
   monitored click AUC by design (early stopping on it would stop at the first check); a
   cosine decay from `--warm-lr` over the budget (the schedule a fixed short budget wants),
   after a short linear warm-up (a fresh Adam's first steps are as large as the LR whatever
   the gradient; they knock a trained model off).
   `init_from` shifts the output bias by log(mean positive weight) of target vs source
   (see train/warmstart.py);
4. the control: run 3 without `init_from` (same budget, schedule and LR, random init). Without
   it, run 3 beating run 2 in fewer steps could be the short decaying schedule's doing, not the
   warm start's; 3 - 4 is what the source model's weights are worth.

"Steps" are optimizer steps (global_step in the run's checkpoints). S counts every step the
from-scratch run trained, patience epochs included (what it cost); the steps to its best
checkpoint are printed too. Passes when run 3's test AUC of every behaviour (click, finish,
watch_time (> 0), like) is at least run 2's minus `tolerance`. Prints per-behaviour AUCs, the
steps, a pass/fail line, whether the warm start beat the control and, last,
`ratio <warm steps / from-scratch steps>`. Exit status 0 on a pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train.checkpoint import read

ROOT = Path(__file__).resolve().parents[1]
BEHAVIOURS = ("click", "finish", "watch_time", "like")


def train(out: Path, overrides: list[str]) -> tuple[dict[str, float], int, int, float]:
    """One run: (metrics.json, steps trained, step of the best checkpoint, seconds)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "train", *overrides, f"paths.output_dir={out}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"run {out.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    last = read(str(out / "checkpoints" / "last.ckpt"))["global_step"]
    best = read(str(out / "checkpoints" / "best.ckpt"))["global_step"]
    return metrics, int(last), int(best), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="training impressions")
    parser.add_argument("--out", help="folder for the four runs (default: a temporary one)")
    parser.add_argument("--fraction", type=float, default=1 / 3, help="warm budget / S")
    parser.add_argument("--tolerance", type=float, default=0.005, help="AUC the warm run may lose")
    parser.add_argument("--max-epochs", type=int, default=30, help="cap for the scratch runs")
    parser.add_argument("--warm-lr", type=float, default=0.003, help="peak LR of the short runs")
    parser.add_argument(
        "--warmup-steps", type=int, default=8, help="linear LR warm-up of the short runs"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the feed and the models")
    parser.add_argument("--source", default="weights=click_only", help="overrides of run 1")
    parser.add_argument("--target", default="weights=seed", help="overrides of runs 2-4")
    parser.add_argument("--short", default="", help="more overrides of runs 3-4 (the short ones)")
    parser.add_argument(
        "--start",
        default="first_epoch",
        choices=("first_epoch", "best"),
        help="run 1's checkpoint that run 3 starts from",
    )
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-warmstart-"))
    rows = args.rows
    common = [
        "hardware=cpu",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"seed={args.seed}",
        f"data.simulator.n_train={rows}",
        f"data.simulator.n_val={rows // 4}",
        f"data.simulator.n_test={rows // 4}",
        f"data.simulator.n_users={max(100, rows // 100)}",
        f"data.simulator.n_videos={max(200, rows // 40)}",
        f"data.simulator.n_authors={max(20, rows // 400)}",
    ]
    source, target = shlex.split(args.source), shlex.split(args.target)
    scratch = [*common, f"trainer.max_epochs={args.max_epochs}"]
    print(f"simulated feed: {rows} training rows, {rows // 4} val, {rows // 4} test; runs in {out}")

    _, source_steps, source_best, t = train(out / "source", [*scratch, *source])
    print(f"1. {args.source} from scratch: {source_steps} steps (best at {source_best}), {t:.0f} s")
    ref, steps, best, t = train(out / "target_scratch", [*scratch, *target])
    print(f"2. {args.target} from scratch: {steps} steps (best at {best}), {t:.0f} s")

    budget = max(1, int(steps * args.fraction))
    short = [
        *common,
        *target,
        f"trainer.max_steps={budget}",
        "trainer.max_epochs=-1",
        f"trainer.val_check_interval={max(1, budget // 4)}",
        "callbacks.early_stopping=null",
        "callbacks.checkpoint.monitor=null",
        "scheduler=cosine",
        f"scheduler.warmup_steps={args.warmup_steps}",
        f"optimizer.lr={args.warm_lr}",
        *shlex.split(args.short),
    ]
    start = out / "source" / "checkpoints" / f"{args.start}.ckpt"
    start_steps = int(read(str(start))["global_step"])
    init = f"init_from={start}"
    warm, warm_steps, _, t = train(out / "target_warm", [*short, init])
    print(f"3. warm-started from 1: {warm_steps} steps (budget {budget}), {t:.0f} s")
    control, _, _, t = train(out / "target_short", short)
    print(f"4. control, 3 from a random init: {budget} steps, {t:.0f} s")

    print(f"\n{'test metric':<22} {'scratch':>8} {'warm':>8} {'control':>8} {'warm-scratch':>13}")
    ok, gain = True, []
    for b in BEHAVIOURS:
        key = f"test/{b}/auc"
        delta = warm[key] - ref[key]
        ok &= delta >= -args.tolerance
        gain.append(warm[key] - control[key])
        print(f"{key:<22} {ref[key]:>8.4f} {warm[key]:>8.4f} {control[key]:>8.4f} {delta:>+13.4f}")
    key = "test/watch_time/xauc"
    print(
        f"{key:<22} {ref[key]:>8.4f} {warm[key]:>8.4f} {control[key]:>8.4f} "
        f"{warm[key] - ref[key]:>+13.4f}  (info)"
    )
    print(
        f"\nsteps: from scratch {steps} (best checkpoint at {best}), warm start {warm_steps} "
        f"(from run 1's {args.start}.ckpt, step {start_steps} of its {source_steps})"
    )
    verdict = "PASS" if ok else "FAIL"
    print(
        f"{verdict}: warm start within {args.tolerance} AUC of from-scratch on every behaviour "
        f"in {warm_steps}/{steps} = {warm_steps / steps:.2f} of its steps "
        f"({warm_steps / max(best, 1):.2f} of the steps to its best checkpoint)"
    )
    print(
        f"warm start - control, mean over the behaviours' AUC: {sum(gain) / len(gain):+.4f} "
        f"(per behaviour {', '.join(f'{g:+.4f}' for g in gain)}): "
        + ("the source weights helped" if min(gain) > 0 else "a random init did as well or better")
    )
    print(f"ratio {warm_steps / steps:.3f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
