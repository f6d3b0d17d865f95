"""`python -m train.report DIR_OR_URL ...`: compare the runs of a sweep.

Finds every run below the given folders (local paths or fsspec URLs; a run is a folder holding
the `metrics.json` and `config.yaml` the job writes), and writes next to them:

* `report.md`  — scheme x per-behaviour metrics of one split (default `test`), the best value of
  each column in bold, the Pareto-optimal schemes marked, the change of each chosen metric
  against a baseline scheme, and the oracle row on simulated data;
* `report.csv` — the same table for machines: `pareto` (1/0) and `best_in` (the columns where
  the row is best) as columns;
* `pareto.png` — one panel per pair of chosen metrics: each series (the schemes; each
  multi-task run's fusion points) in its own colour and marker with its front of the pair
  joined, Pareto-optimal rows (over all chosen metrics) filled, the oracle as a star; only the
  points on the pair's front are labelled, the others carry a number keyed in report.md.

Pipeline, one module per step (each imports only those above it, so there is no circle):

    runs.py     find_runs(roots) -> [Run]            read metrics.json + config.yaml
    labels.py   label_runs(runs) -> [str]            scheme name + changed knobs
    rows.py     row sources: (runs, split) -> [Row]  scheme_rows, oracle_row
    fusion.py   fusion_rows                          α sweep over each multi-task run's predictions
    table.py    build_report(runs, ...) -> Report    columns, chosen metrics, Pareto, best, baseline
    fronts.py   layout(report), verdicts(report)     series, labelled/numbered points, verdicts
    plot.py     plot_pareto(report) -> PNG bytes
    render.py   to_markdown / to_csv; write_report(report, out)
    __main__.py the command line

`Run` and `Row` are `train.layout`'s. ROW_SOURCES (table.py) is `scheme_rows` (one row per
sample-weighting run) and `fusion.fusion_rows` (for each run that saved `predictions.parquet`
— `model=multihead` or any multi-task model writing the same file — one row per α of a grid
swept over its saved test predictions, kind `fusion`, series the run's; `--fusion-grid 0,0.5,1`
sets the α values of the non-label heads).

Adding rows of another kind: write a function `(runs, split) -> list[Row]` that picks the runs
it understands, returns one Row per point with its own `kind`, a readable `label` and `values`
keyed `"<behaviour>/<metric>"` like the scheme rows, and append it to ROW_SOURCES (or pass
`sources=` to build_report). Pareto marks and best-in-column are computed over all non-oracle
rows together, so every kind competes on one front; the plot draws one front per series
(`Row.series`, else the kind), in its own colour and marker. `scheme_rows` labels a run by its `weights` config; a source that claims runs (as
fusion claims multi-head ones) should have `scheme_rows` skip them via `is_scheme_run`.
"""

from __future__ import annotations

from collections.abc import Sequence

from train.layout import Row, Run
from train.report.fronts import Layout, Verdict, layout, verdicts
from train.report.fusion import FusionError, fusion_rows
from train.report.labels import CONF_DIR, knobs, label_runs, scheme_defaults
from train.report.plot import draw_pareto, plot_pareto
from train.report.render import to_csv, to_markdown, write_report
from train.report.rows import RowSource, is_scheme_run, oracle_row, scheme_rows
from train.report.runs import ReportError, find_runs, split_values
from train.report.table import (
    BASELINE,
    ROW_SOURCES,
    Report,
    behaviour_order,
    build_report,
    columns_of,
    default_metrics,
    parse_metrics,
)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """`python -m train.report` from Python (see `train.report.__main__`). The command line is
    imported on call, not here: `python -m train.report` imports this package before it runs
    `__main__`, which must not be in `sys.modules` by then."""
    from train.report.__main__ import main as cli

    return cli(argv)


__all__ = [
    "BASELINE",
    "CONF_DIR",
    "ROW_SOURCES",
    "FusionError",
    "Layout",
    "Report",
    "ReportError",
    "Row",
    "RowSource",
    "Run",
    "Verdict",
    "behaviour_order",
    "build_report",
    "columns_of",
    "default_metrics",
    "draw_pareto",
    "find_runs",
    "fusion_rows",
    "is_scheme_run",
    "knobs",
    "label_runs",
    "layout",
    "main",
    "oracle_row",
    "parse_metrics",
    "plot_pareto",
    "scheme_defaults",
    "scheme_rows",
    "split_values",
    "to_csv",
    "to_markdown",
    "verdicts",
    "write_report",
]
