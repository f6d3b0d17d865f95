"""The cost of per-user NDCG@k next to GAUC, both exact, on one validation split.

    python bench/ndcg.py [--rows 1000000] [--groups 100000] [--k 10] [--threads 2] [--rounds 5]
                         [--device cpu]

Rows get a random user among `--groups`, a score rounded to 3 decimals (ties, as float32
probabilities have) and a 5% positive label. Timed in back-to-back rounds on the same float64
tensors, each to the value on the host:

* `gauc` and `ndcg` (train.metrics, label > 0 as gain): each function on its own, each sorting
  the rows by (user, score) itself;
* the validation epoch's `BehaviourMetrics.compute` for one binary label (auc, gauc, logloss,
  calibration) with `ndcg_k=None` and with `ndcg_k=k`: there NDCG reuses the sort of GAUC, and
  the difference is what the metric adds to every validation epoch.

Medians are printed, and last `ratio <ndcg/gauc>`, the median of the per-round ratios of the
two functions (the figure a shared machine disturbs least).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from train.metrics import BehaviourMetrics, gauc, ndcg


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = fn()
    if isinstance(value, torch.Tensor):
        value.item()  # the value on the host, as the module reads it
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--groups", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(0)
    groups = torch.randint(0, args.groups, (args.rows,), generator=gen).to(device)
    scores = (torch.rand(args.rows, generator=gen, dtype=torch.float64) * 1000).round() / 1000
    label = (torch.rand(args.rows, generator=gen) < 0.05).to(torch.float64)
    scores, label = scores.to(device), label.to(device)

    def split(ndcg_k: int | None) -> Callable[[], dict[str, float]]:
        metric = BehaviourMetrics(
            ["click"], [], "click", ndcg_k=ndcg_k, compute_with_cache=False
        ).to(device)
        metric.update(scores, label[:, None], groups)
        return metric.compute

    runs: dict[str, Callable[[], object]] = {
        "gauc": lambda: gauc(scores, label, groups),
        "ndcg": lambda: ndcg(scores, label, groups, args.k),
        "compute without ndcg": split(None),
        f"compute with ndcg@{args.k}": split(args.k),
    }
    for fn in runs.values():  # warm-up (allocator, kernels)
        timed(fn, device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    users = int(torch.unique(groups).numel())
    print(
        f"{args.rows} rows, {users} users, k={args.k}, {args.device}, {args.threads} threads, "
        f"{args.rounds} rounds; ndcg@{args.k}={ndcg(scores, label, groups, args.k).item():.4f}"
    )
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values) * 1000:.0f} ms")
    ratios = [n / g for n, g in zip(times["ndcg"], times["gauc"], strict=True)]
    print(f"ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
