"""Warm-started re-weighting vs from-scratch runs of the same scheme, on simulated feeds of
several kinds (size, noise, epochs to converge).

    python bench/warmstart.py [--setting base|large|noisy|...] [--rows N] [--ids X] [--noise S]
                              [--seed 0] [--fraction 0.3333] [--tolerance 0.005]
                              [--source "weights=click_only"] [--target "weights=seed"]
                              [--probe-steps K] [--short "init_schedule.lr=0.001"]
                              [--json FILE] [--out DIR [--reuse] [--tag T]]

A setting is a simulated feed: `--rows` training impressions (val and test a quarter each),
`--ids` the number of users, videos and authors per row relative to `base` (more ids per row:
fewer impressions per id, more epochs to converge and more to memorise), `--noise` the
simulator's `interest_scale` (user x topic tastes the model's id columns do not show: noise to
it). Named settings fill these in (`SETTINGS`); explicit flags override them.

Real `python -m train` runs on one seeded feed:

1. the source scheme from scratch, to convergence (early stopping on the monitored metric);
2. the target scheme from scratch, to convergence: the reference, and its step count S;
3. the target scheme with `init_from=<run 1's folder>` and `trainer.max_steps=S/3`, nothing
   else: the job probes the checkpoints run 1 kept (first_epoch, best, last), continues from
   the best, with the warm-start schedule (`init_schedule`) by default;
4. the candidate the probe did not pick (first_epoch or best), same budget and schedule: was
   the pick right? (`--no-other` skips it);
5. the control: run 3 from a random init (same budget, LR and schedule). Without it, run 3
   beating run 2 in fewer steps could be the short decaying schedule's doing; 3 - 5 is what
   the source model's weights are worth.

"Steps" are optimizer steps. S counts every step the from-scratch run trained, patience epochs
included (what it cost). A run "lands" when its test metric is at least run 2's minus
`--tolerance` on each of click AUC, finish AUC, like AUC and watch-time XAUC (watch-time AUC
equals click AUC on this feed: watch time > 0 exactly when clicked). Prints per-metric values,
the probe's table, one verdict line per short run and, last, `ratio <warm steps / S>`;
`--json FILE` appends one JSON line with everything. Exit status 0 when run 3 lands.
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

from omegaconf import OmegaConf

from train.checkpoint import read

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("click/auc", "finish/auc", "like/auc", "watch_time/xauc")
SETTINGS = {
    # The feed of the README's earlier figures (where first_epoch.ckpt beat best.ckpt).
    "earlier": {"rows": 200_000, "ids": 1.0, "noise": 0.0},
    # The same at half the rows: converges in ~3 epochs of 25 steps.
    "base": {"rows": 100_000, "ids": 1.0, "noise": 0.0},
    # Twice the rows and a quarter of the ids per row: ~8x the impressions per id.
    "large": {"rows": 200_000, "ids": 0.25, "noise": 0.0},
    # Fewer rows, twice the ids per row and user x topic tastes the ids do not show.
    "noisy": {"rows": 60_000, "ids": 2.0, "noise": 0.8},
}


REUSE = False
"""--reuse: a run whose folder already holds metrics.json is read, not trained again."""


def train(out: Path, overrides: list[str]) -> tuple[dict[str, float], int, int, float, str]:
    """One run: (metrics.json, steps trained, step of best.ckpt, seconds, stdout)."""
    start = time.perf_counter()
    if REUSE and (out / "metrics.json").exists():
        log = out / "stdout.txt"
        return (*_read(out), 0.0, log.read_text() if log.exists() else "")
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
    (out / "stdout.txt").write_text(done.stdout)
    return (*_read(out), seconds, done.stdout)


def _read(out: Path) -> tuple[dict[str, float], int, int]:
    metrics = json.loads((out / "metrics.json").read_text())
    last = read(str(out / "checkpoints" / "last.ckpt"))["global_step"]
    best = read(str(out / "checkpoints" / "best.ckpt"))["global_step"]
    return metrics, int(last), int(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="base", choices=sorted(SETTINGS))
    parser.add_argument("--rows", type=int, help="training impressions")
    parser.add_argument("--ids", type=float, help="users/videos/authors per row, x base")
    parser.add_argument("--noise", type=float, help="data.simulator.interest_scale")
    parser.add_argument("--out", help="folder for the runs (default: a temporary one)")
    parser.add_argument("--fraction", type=float, default=1 / 3, help="warm budget / S")
    parser.add_argument("--tolerance", type=float, default=0.005, help="metric a run may lose")
    parser.add_argument("--max-epochs", type=int, default=30, help="cap for the scratch runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the feed and the models")
    parser.add_argument("--source", default="weights=click_only", help="overrides of run 1")
    parser.add_argument("--target", default="weights=seed", help="overrides of runs 2-5")
    parser.add_argument("--probe-steps", type=int, help="init_probe_steps (default: the job's)")
    parser.add_argument(
        "--short", default="", help="more overrides of runs 3-5, e.g. init_schedule.lr=0.001"
    )
    parser.add_argument("--no-other", action="store_true", help="skip run 4")
    parser.add_argument("--json", help="append the results to this file (one JSON line)")
    parser.add_argument(
        "--reuse", action="store_true", help="with --out: read runs already there, train the rest"
    )
    parser.add_argument("--tag", default="", help="suffix of the short runs' folders")
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    setting = {**SETTINGS[args.setting]}
    for key in ("rows", "ids", "noise"):
        if getattr(args, key) is not None:
            setting[key] = getattr(args, key)
    rows, ids = int(setting["rows"]), float(setting["ids"])
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-warmstart-"))
    common = [
        "hardware=cpu",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"seed={args.seed}",
        f"data.simulator.n_train={rows}",
        f"data.simulator.n_val={rows // 4}",
        f"data.simulator.n_test={rows // 4}",
        f"data.simulator.n_users={max(100, int(ids * rows / 100))}",
        f"data.simulator.n_videos={max(200, int(ids * rows / 40))}",
        f"data.simulator.n_authors={max(20, int(ids * rows / 400))}",
        f"data.simulator.interest_scale={setting['noise']}",
    ]
    source, target = shlex.split(args.source), shlex.split(args.target)
    scratch = [*common, f"trainer.max_epochs={args.max_epochs}"]
    print(f"setting {args.setting} {setting}, seed {args.seed}: runs in {out}")

    _, source_steps, source_best, t, _ = train(out / "source", [*scratch, *source])
    print(f"1. {args.source} from scratch: {source_steps} steps (best at {source_best}), {t:.0f} s")
    ref, steps, best, t, _ = train(out / "target_scratch", [*scratch, *target])
    print(f"2. {args.target} from scratch: {steps} steps (best at {best}), {t:.0f} s")

    budget = max(1, int(steps * args.fraction))
    extra = shlex.split(args.short)
    if args.probe_steps is not None:
        extra.append(f"init_probe_steps={args.probe_steps}")
    short = [*common, *target, f"trainer.max_steps={budget}", *extra]
    results: dict[str, dict[str, float]] = {"scratch": ref}
    results["warm"], warm_steps, _, t, log = train(
        out / f"target_warm{args.tag}", [*short, f"init_from={out / 'source'}"]
    )
    probe = [line for line in log.splitlines() if "probe steps" in line or "(step " in line]
    chosen = next((line.split()[0] for line in probe if "<- continued from" in line), "")
    picked = Path(chosen).stem or "?"
    print(f"3. warm start, auto-picked ({picked}): {warm_steps} steps, {t:.0f} s")
    print("\n".join(f"   {line.strip()}" for line in probe))
    other = "best" if picked == "first_epoch" else "first_epoch"
    if not args.no_other:
        start = out / "source" / "checkpoints" / f"{other}.ckpt"
        results["other"], _, _, t, _ = train(
            out / f"target_other{args.tag}", [*short, f"init_from={start}"]
        )
        print(f"4. warm start from {other}.ckpt (not picked): {t:.0f} s")
    # The control: the warm start's schedule and budget, from a random init.
    schedule = OmegaConf.load(ROOT / "train" / "conf" / "train.yaml").init_schedule
    values = {k: v for k, v in schedule.items()}
    for item in extra:
        key, _, value = item.partition("=")
        if key.startswith("init_schedule."):
            values[key.removeprefix("init_schedule.")] = float(value)
    control = [
        *short,
        "trainer.max_epochs=-1",
        "callbacks.early_stopping=null",
        "callbacks.checkpoint.monitor=null",
        "scheduler=cosine",
        f"scheduler.warmup_steps={int(values['warmup_steps'])}",
        f"scheduler.floor={values['floor']}",
        f"optimizer.lr={values['lr']}",
    ]
    results["control"], _, _, t, _ = train(out / f"target_control{args.tag}", control)
    print(f"5. control, random init: {budget} steps, {t:.0f} s")

    names = [n for n in ("warm", "other", "control") if n in results]
    labels = {"warm": f"warm ({picked})", "other": f"warm ({other})", "control": "control"}
    print(f"\n{'test metric':<22} {'scratch':>8}" + "".join(f" {labels[n]:>19}" for n in names))
    landed = {}
    for n in names:
        deltas = {m: results[n][f"test/{m}"] - ref[f"test/{m}"] for m in METRICS}
        landed[n] = (all(d >= -args.tolerance for d in deltas.values()), deltas)
    for m in METRICS:
        cells = "".join(f" {landed[n][1][m]:>+19.4f}" for n in names)
        print(f"test/{m:<17} {ref[f'test/{m}']:>8.4f}{cells}")
    for n in names:
        verdict = "lands" if landed[n][0] else "misses"
        print(f"{labels[n]} {verdict} within {args.tolerance} of from scratch on every metric")
    print(
        f"steps: from scratch {steps} (best at {best}), short runs {budget} "
        f"= {budget / steps:.2f} of them; source run {source_steps} steps"
    )
    if args.json:
        record = {
            "setting": args.setting,
            **setting,
            "seed": args.seed,
            "source": args.source,
            "target": args.target,
            "short": args.short,
            "probe_steps": args.probe_steps,
            "steps": steps,
            "budget": budget,
            "source_steps": source_steps,
            "picked": picked,
            "probe": probe,
            "deltas": {labels[n]: landed[n][1] for n in names},
            "lands": {labels[n]: landed[n][0] for n in names},
        }
        with open(args.json, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    print(f"ratio {warm_steps / steps:.3f}")
    sys.exit(0 if landed["warm"][0] else 1)


if __name__ == "__main__":
    main()
