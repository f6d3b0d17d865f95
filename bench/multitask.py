"""The cost of a multi-task step against a `model=dnn` step at the same batch.

    python bench/multitask.py [--rows 400000] [--threads 2] [--repeat 3] [--arms dnn,mmoe,...]

Every arm trains one epoch of the same in-memory simulated rows through the job's own path
(ImpressionDataModule + RankingModule + lightning.Trainer, batch 4096, the 8 categorical and 4
dense features of bench/throughput.py) with the conf/model/ defaults of each network: dnn (one
logit on the `seed` scheme), multihead, mmoe and ple (a head per behaviour, each on its own
loss), ple with two shared experts (its default before one), and mmoe with conditional heads,
with per-head weights, and with each loss balancing.
Every arm runs once per round (load drifts hit them alike); prints ms per step (median) and
each arm's step time over dnn's (the median of the per-round ratios). The issue's bound:
a multi-task step costs at most 1.6x a dnn step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import BATCH, data_module, job_trainer, scheme  # noqa: E402
from train.model import DNN, MultiHead, network_config  # noqa: E402
from train.module import RankingModule  # noqa: E402
from train.multitask import PLE, MMoE  # noqa: E402
from train.optim import SparseDenseAdam  # noqa: E402
from train.weights import head_schemes  # noqa: E402

CONF = ROOT / "train" / "conf" / "model"


def defaults(name: str) -> dict:
    """conf/model/<name>.yaml's network options (the job's defaults), heads given here."""
    config = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    return {
        k: v for k, v in network_config(config).items() if not k.startswith("_") and k != "heads"
    }


ARMS = {
    "dnn": ("dnn", {}, {}),
    "multihead": ("multihead", {}, {}),
    "mmoe": ("mmoe", {}, {}),
    "ple": ("ple", {}, {}),
    "ple 2 shared": ("ple", {"shared_experts": 2}, {}),  # the default before one shared expert
    "mmoe condition": ("mmoe", {"condition": {"finish": "click"}}, {}),
    "mmoe head_weights": ("mmoe", {}, {"head_weights": {"click": "seed"}}),
    "mmoe uncertainty": ("mmoe", {}, {"balance": "uncertainty"}),
    "mmoe gradnorm": ("mmoe", {}, {"balance": "gradnorm"}),
}
NETWORKS = {"dnn": DNN, "multihead": MultiHead, "mmoe": MMoE, "ple": PLE}


def module(data, name: str, options: dict, training: dict) -> RankingModule:
    cls = NETWORKS[name]
    spec = data.spec
    heads = {} if name == "dnn" else {"heads": list(spec.behaviour_names)}
    network = cls(spec.cardinalities, len(spec.dense), **heads, **(defaults(name) | options))
    return RankingModule(
        network,
        scheme(),
        spec,
        data.stats,
        optimizer=SparseDenseAdam,
        head_schemes=head_schemes(training.get("head_weights")),
        balance=training.get("balance"),
    )


def ms_per_step(data, arm: tuple[str, dict, dict]) -> float:
    model, trainer = module(data, *arm), job_trainer()
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    steps = -(-len(data.tables["train"]) // BATCH)
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every arm (medians)")
    parser.add_argument("--arms", default=",".join(ARMS), help="a comma list of arms (dnn first)")
    args = parser.parse_args()
    arms = {name: ARMS[name] for name in args.arms.split(",")}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = data_module(args.rows, scale=1)
    runs: dict[str, list[float]] = {name: [] for name in arms}
    for turn in range(args.repeat):
        for name, arm in arms.items():
            runs[name].append(ms_per_step(data, arm))
            print(f"round {turn + 1}: {name}: {runs[name][-1]:.1f} ms/step", file=sys.stderr)
    print(f"{args.rows:,} rows, batch {BATCH}, {args.threads} threads, medians of {args.repeat}")
    print(f"{'arm':<20} {'ms/step':>8} {'x dnn':>6}")
    for name, times in runs.items():
        ratio = statistics.median(t / d for t, d in zip(times, runs["dnn"], strict=True))
        print(f"{name:<20} {statistics.median(times):>8.1f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
