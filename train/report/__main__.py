"""`python -m train.report DIR_OR_URL ... [--metrics ...] [--split test] [--baseline LABEL]
[--out DIR_OR_URL] [--fusion-grid 0,0.5,1] [--tracker mlflow|wandb [--tracker-run NAME]]`: the
command line of the report.

Only argument parsing and the one place that turns the report's input errors (`ReportError`,
`FusionError`, a missing file) into a one-line exit instead of a traceback; the work is the
pipeline of `train.report`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial

from train.report.fusion import GRID, FusionError, fusion_rows, parse_grid
from train.report.render import to_markdown, write_report
from train.report.rows import scheme_rows
from train.report.runs import ReportError, find_runs
from train.report.table import BASELINE, build_report


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        prog="python -m train.report",
        description="Compare the runs below the given folders (paths or fsspec URLs): "
        "report.md, report.csv and pareto.png.",
    )
    parser.add_argument("roots", nargs="+", metavar="DIR_OR_URL")
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="METRIC",
        help="Pareto metrics: BEHAVIOUR/METRIC[:max|:min] or a bare metric for every behaviour "
        "(default: auc of every binary behaviour, xauc of every continuous one)",
    )
    parser.add_argument("--split", default="test", help="which split's metrics (default: test)")
    parser.add_argument(
        "--baseline", help=f"row label the changes are measured against (default: {BASELINE})"
    )
    parser.add_argument("--out", help="output folder (default: the first DIR_OR_URL)")
    parser.add_argument(
        "--fusion-grid",
        default=",".join(f"{a:g}" for a in GRID),
        help="α values of each non-label head swept over each multi-task run's test predictions "
        "(the label head keeps α=1; default: %(default)s)",
    )
    parser.add_argument(
        "--tracker",
        choices=("mlflow", "wandb"),
        help="also log report.md, report.csv and pareto.png as a run of this tracker, "
        "connected from the environment as the job's loggers are (MLFLOW_TRACKING_URI and "
        "MLFLOW_EXPERIMENT_NAME; WANDB_MODE, WANDB_PROJECT, ...)",
    )
    parser.add_argument(
        "--tracker-run", help="the tracker run's name (default: report-<output folder name>)"
    )
    args = parser.parse_args(argv)
    try:
        grid = parse_grid(args.fusion_grid)
        sources = (scheme_rows, partial(fusion_rows, grid=grid))
        runs, notes = find_runs(args.roots)
        report = build_report(
            runs, args.metrics, args.split, args.baseline, args.roots, sources, notes
        )
        written = write_report(report, args.out or args.roots[0])
    except (ReportError, FileNotFoundError, FusionError) as err:
        sys.exit(f"error: {err}")
    print(to_markdown(report, image=None))
    print("wrote " + ", ".join(written))
    if args.tracker:
        from train.errors import UpweightError
        from train.trackers import log_report

        out = args.out or args.roots[0]
        name = args.tracker_run or "report-" + out.rstrip("/").rsplit("/", 1)[-1]
        try:
            print(log_report(args.tracker, written, name, out))
        except UpweightError as err:
            sys.exit(f"error: {err}")
    return written


if __name__ == "__main__":
    main()
