"""Conditional (ESMM-style) finish and like heads against plain ones, on two simulated feeds.

    python bench/conditional.py [--models multihead,mmoe] [--feeds worked,second] [--seeds 0,11]
                                [--monitor val/finish/head_auc] [--out DIR [--reuse]]

For every model, feed and init seed, two real `python -m train` runs: plain heads, and
`model.condition={finish: click, like: click}`. Both are early-stopped and scored on `--monitor`:
by default the finish head's validation AUC, since what is compared is the finish head, and a
run monitored on click keeps the checkpoint that is best for click (`--monitor val/click/auc`,
the job's default, shows that view). The feeds are the README worked example's and its second
feed (more users and videos, twice the clickbait, another seed); `--seeds` are init seeds
(`seed=`), the feed's own seed stays fixed. Prints each pair's test head AUCs, the conditional
heads' gains on finish and like and, last, `wins K/N`: the pairs where the conditional finish
head reaches the plain one. Exit status 0 when it does in every pair.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SIZE = [
    "hardware=cpu",
    "trainer.enable_progress_bar=false",
    "data.simulator.n_train=100000",
    "data.simulator.n_val=25000",
    "data.simulator.n_test=25000",
]
FEEDS = {
    "worked": [
        "data.simulator.n_users=1000",
        "data.simulator.n_videos=2500",
        "data.simulator.n_authors=250",
        "data.simulator.seed=0",
    ],
    "second": [
        "data.simulator.n_users=2000",
        "data.simulator.n_videos=5000",
        "data.simulator.n_authors=500",
        "data.simulator.clickbait_share=0.3",
        "data.simulator.seed=1",
    ],
}
CONDITION = "model.condition={finish: click, like: click}"
HEADS = ("click", "finish", "like")


def run(folder: Path, overrides: list[str], reuse: bool) -> dict[str, float]:
    metrics = folder / "metrics.json"
    if not (reuse and metrics.exists()):
        command = [sys.executable, "-m", "train", *overrides, f"paths.output_dir={folder}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    values = json.loads(metrics.read_text())
    return {head: values[f"test/{head}/head_auc"] for head in HEADS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="multihead,mmoe")
    parser.add_argument("--feeds", default="worked,second")
    parser.add_argument("--seeds", default="0,11")
    parser.add_argument("--monitor", default="val/finish/head_auc")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="skip runs already in --out")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="conditional-")).resolve()
    print(f"runs in {out}; monitor {args.monitor}")
    print(
        "model      feed    seed  plain c/f/l               conditional c/f/l         Δfinish  Δlike"
    )
    wins = pairs = 0
    for model in args.models.split(","):
        for feed in args.feeds.split(","):
            for seed in args.seeds.split(","):
                common = [f"model={model}", *SIZE, *FEEDS[feed], f"seed={seed}"]
                common.append(f"monitor={args.monitor}")
                name = f"{model}_{feed}_{seed}"
                plain = run(out / f"{name}_plain", common, args.reuse)
                conditional = run(out / f"{name}_conditional", [*common, CONDITION], args.reuse)
                gain = {h: conditional[h] - plain[h] for h in HEADS}
                pairs += 1
                wins += gain["finish"] >= 0
                shown = ["/".join(f"{r[h]:.4f}" for h in HEADS) for r in (plain, conditional)]
                print(
                    f"{model:10s} {feed:7s} {seed:>4s}  {shown[0]:24s}  {shown[1]:24s}  "
                    f"{gain['finish']:+.4f}  {gain['like']:+.4f}"
                )
    print(f"wins {wins}/{pairs}")
    sys.exit(0 if wins == pairs else 1)


if __name__ == "__main__":
    main()
