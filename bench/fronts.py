"""Multi-task rivals against the multihead fusion front, at equal click AUC.

    python bench/fronts.py RUNS_FOLDER [--baseline multihead] [--x click/auc] [--y finish/auc]
        [--floor 0.03] [--grid 0,0.25,0.5,1,2 | --fine 0.02]

Reads every run below RUNS_FOLDER (as `train.report` does), sweeps the fusion α of every run that
saved test predictions over the grid (label head at α = 1, every other head at each grid value,
and each head alone; or with `--fine STEP` only the two heads of x and y: α_x = 1, α_y from 0 to
4 in steps of STEP, then α_y = 1 and α_x down to 0: a dense front, so that the comparison does
not depend on how coarse the grid is), and compares each run's fusion points with the baseline run's fusion front
(the run whose folder name is `--baseline`): the front's y interpolated at the point's x
(`train.pareto.gains_at_equal_x`: dominated points never count, no extrapolation). Only points
with x above the best weighting scheme run's x minus `--floor` count (click_only - 0.03 in the
issue). Prints, per run, its best gain in y over the baseline front and where; and, for the
weighting scheme runs, the same against the baseline front. The issue's bound: the best mmoe or
ple point beats the multihead front by >= 0.005 finish AUC somewhere above click_only - 0.03.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.layout import PREDICTIONS_FILE, join  # noqa: E402
from train.pareto import default_direction, gains_at_equal_x  # noqa: E402
from train.report.fusion import (  # noqa: E402
    fusion_metrics,
    fusion_rows,
    parse_grid,
    read_predictions,
)
from train.report.rows import is_scheme_run  # noqa: E402
from train.report.runs import find_runs, split_values  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs")
    parser.add_argument("--baseline", default="multihead")
    parser.add_argument("--grid", default="0,0.25,0.5,1,2")
    parser.add_argument("--x", default="click/auc")
    parser.add_argument("--y", default="finish/auc")
    parser.add_argument("--floor", type=float, default=0.03)
    parser.add_argument("--fine", type=float, default=None, help="dense two-head sweep step")
    args = parser.parse_args()
    runs, _ = find_runs([args.runs])
    by_run: dict[str, list[tuple[str, float, float]]] = {}
    if args.fine:
        hx, hy = args.x.split("/")[0], args.y.split("/")[0]
        steps = [round(k * args.fine, 6) for k in range(round(4 / args.fine) + 1)]
        alphas = [{hx: 1.0, hy: a} for a in steps] + [{hx: a, hy: 1.0} for a in steps if a < 1]
        for run in runs:
            if not run.has_predictions:
                continue
            pred = read_predictions(join(run.url, PREDICTIONS_FILE))
            for alpha in alphas:
                values = fusion_metrics(pred, alpha)
                label = f"{Path(run.url).name} {alpha}"
                by_run.setdefault(Path(run.url).name, []).append(
                    (label, values[args.x], values[args.y])
                )
    else:
        for row in fusion_rows(runs, "test", parse_grid(args.grid)):
            name = Path(row.source).name
            by_run.setdefault(name, []).append((row.label, row.values[args.x], row.values[args.y]))
    schemes = {
        Path(r.url).name: split_values(r.metrics, "test", False) for r in runs if is_scheme_run(r)
    }
    best_scheme_x = max(v[args.x] for v in schemes.values())
    floor = best_scheme_x - args.floor
    if args.baseline not in by_run:
        sys.exit(f"error: no multi-task run named {args.baseline!r} below {args.runs}")
    baseline = {args.baseline: [(x, y) for _, x, y in by_run[args.baseline]]}
    directions = (default_direction(args.x), default_direction(args.y))
    print(
        f"{args.y} gain over the {args.baseline} fusion front at equal {args.x}, x >= {floor:.4f}"
    )
    candidates = {n: p for n, p in by_run.items() if n != args.baseline}
    candidates |= {n: [(n, v[args.x], v[args.y])] for n, v in schemes.items()}
    for name, points in sorted(candidates.items()):
        above = [p for p in points if p[1] >= floor]
        gains = [g for g in gains_at_equal_x(above, baseline, directions) if g.gain is not None]
        if not gains:
            print(f"{name:<24} not comparable (no point above the floor within the front's range)")
            continue
        # gain: how much the front beats the point; the point's lead is its negative.
        best = min(gains, key=lambda g: g.gain)
        print(
            f"{name:<24} best {-best.gain:+.4f} at {args.x} {best.x:.4f} ({best.point}: "
            f"{best.y:.4f} vs front {best.front_y:.4f}); {len(gains)} points compared"
        )


if __name__ == "__main__":
    main()
