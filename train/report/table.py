"""The comparison itself: rows from every source, the columns, the chosen metrics and their
directions, the Pareto marks, the best row of every column and the baseline — a `Report`,
computed once and then only rendered (`render`, `plot`).

Pareto marks and best-in-column are computed over all non-oracle rows together, so schemes and
fusion points compete on one front; the oracle is shown for reference, never ranked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from train.layout import METRICS, Row, Run
from train.pareto import Direction, default_direction, pareto_mask
from train.report.fusion import fusion_rows
from train.report.labels import differing_keys, flatten
from train.report.rows import RowSource, oracle_row, scheme_rows
from train.report.runs import ReportError

BASELINE = "click_only"
ARROW: dict[Direction, str] = {"max": "↑", "min": "↓"}
"""How a direction reads beside a metric's name, in the table and on the plot's axes."""
# fusion_rows: the α sweep over the saved test predictions of multi-task runs.
ROW_SOURCES: tuple[RowSource, ...] = (scheme_rows, fusion_rows)


@dataclass
class Report:
    rows: list[Row]
    columns: list[str]
    """Every `"<behaviour>/<metric>"` column, behaviour by behaviour."""
    chosen: list[str]
    """The columns the Pareto marks are computed over."""
    directions: list[Direction]
    pareto: list[bool | None]
    """Per row: Pareto-optimal over `chosen` (None for the oracle, never compared)."""
    best: dict[str, set[int]]
    """Column -> indices of the rows holding its best value (ties: all of them)."""
    baseline: int | None
    split: str
    roots: list[str]
    notes: list[str] = field(default_factory=list)


def behaviour_order(runs: Sequence[Run], rows: Sequence[Row]) -> list[str]:
    """The data's behaviour order (config `data.behaviours`), then any other seen, sorted."""
    order: list[str] = []
    for run in runs:
        declared = (run.config.get("data") or {}).get("behaviours") or {}
        for b in declared:
            if b not in order:
                order.append(str(b))
    seen = sorted({c.split("/")[0] for row in rows for c in row.values} - set(order))
    present = {c.split("/")[0] for row in rows for c in row.values}
    return [b for b in order if b in present] + seen


def columns_of(rows: Sequence[Row], behaviours: Sequence[str]) -> list[str]:
    present = {c for row in rows for c in row.values}
    extra = sorted({c.split("/", 1)[1] for c in present} - set(METRICS))
    return [f"{b}/{m}" for b in behaviours for m in (*METRICS, *extra) if f"{b}/{m}" in present]


def default_metrics(rows: Sequence[Row], behaviours: Sequence[str]) -> list[str]:
    """AUC of every binary behaviour and XAUC of every continuous one (a continuous behaviour is
    one with an `xauc` metric)."""
    present = {c for row in rows if row.kind != "oracle" for c in row.values}
    chosen = []
    for b in behaviours:
        if f"{b}/xauc" in present:
            chosen.append(f"{b}/xauc")
        elif f"{b}/auc" in present:
            chosen.append(f"{b}/auc")
    return chosen


def parse_metrics(
    specs: Sequence[str], rows: Sequence[Row], behaviours: Sequence[str]
) -> tuple[list[str], list[Direction]]:
    """`click/auc`, `click/logloss:min`, or a bare metric (`auc`: that metric of every behaviour
    that has it) -> columns and directions."""
    present = {c for row in rows if row.kind != "oracle" for c in row.values}
    columns: list[str] = []
    directions: list[Direction] = []
    for spec in specs:
        name, _, direction = spec.partition(":")
        if direction and direction not in ("max", "min"):
            raise ReportError(f"--metrics {spec!r}: direction must be 'max' or 'min'")
        if "/" in name:
            names = [name.removeprefix("test/").removeprefix("val/")]
        else:
            names = [f"{b}/{name}" for b in behaviours if f"{b}/{name}" in present]
        missing = [n for n in names if n not in present]
        if not names or missing:
            raise ReportError(
                f"--metrics {spec!r}: no run has {missing[0] if missing else name!r}; "
                f"available: {', '.join(sorted(present))}"
            )
        for n in names:
            try:
                d: Direction = direction or default_direction(n)  # type: ignore[assignment]
            except ValueError as err:
                raise ReportError(f"--metrics {spec!r}: {err}") from err
            if n not in columns:
                columns.append(n)
                directions.append(d)
    return columns, directions


def _goodness(column: str, value: float) -> float:
    """Larger is better: AUCs as they are, logloss negated, calibration (before and after the
    odds correction) and the odds factor (the inflation) by their distance to 1."""
    metric = column.rsplit("/", 1)[-1]
    if metric in ("calibration", "calibration_corrected", "odds_factor"):
        return -abs(math.log(value)) if value > 0 else -math.inf
    try:
        return value if default_direction(metric) == "max" else -value
    except ValueError:
        return value


def _data_differences(runs: Sequence[Run]) -> list[str]:
    flats = [flatten(r.config.get("data") or {}) for r in runs]
    if len(flats) < 2:
        return []
    keys = differing_keys(flats)
    if not keys:
        return []
    return [
        "the runs differ in their data config ("
        + ", ".join(f"data.{k}" for k in keys[:5])
        + (", ..." if len(keys) > 5 else "")
        + "): compare rows with care"
    ]


def build_report(
    runs: Sequence[Run],
    metrics: Sequence[str] | None = None,
    split: str = "test",
    baseline: str | None = None,
    roots: Sequence[str] = (),
    sources: Sequence[RowSource] = ROW_SOURCES,
    notes: Sequence[str] = (),
) -> Report:
    """Rows from every source (plus the oracle), Pareto marks over the chosen metrics (default:
    `default_metrics`), the best row of every column, and the baseline row."""
    rows = [row for source in sources for row in source(runs, split)]
    rows = [r for r in rows if r.values]
    if not rows:
        splits = sorted({k.split("/")[0] for r in runs for k in r.metrics})
        raise ReportError(f"no run has metrics of split {split!r}; the runs have {splits}")
    oracle, oracle_notes = oracle_row(runs, split)
    if oracle is not None:
        rows.append(oracle)
    behaviours = behaviour_order(runs, rows)
    columns = columns_of(rows, behaviours)
    if metrics:
        chosen, directions = parse_metrics(metrics, rows, behaviours)
    else:
        chosen = default_metrics(rows, behaviours)
        directions = [default_direction(c) for c in chosen]
    if not chosen:
        raise ReportError("no metric to compare on: the runs have no auc/xauc; pass --metrics")

    compared = [i for i, r in enumerate(rows) if r.kind != "oracle"]
    points = [[rows[i].values.get(c, math.nan) for c in chosen] for i in compared]
    mask = pareto_mask(points, directions)
    pareto: list[bool | None] = [None] * len(rows)
    for i, m in zip(compared, mask, strict=True):
        pareto[i] = m

    best: dict[str, set[int]] = {}
    for c in columns:
        scored = [
            (_goodness(c, rows[i].values[c]), i)
            for i in compared
            if not math.isnan(rows[i].values.get(c, math.nan))
        ]
        if scored:
            top = max(s for s, _ in scored)
            best[c] = {i for s, i in scored if s >= top - 1e-12}

    base_index = None
    wanted = baseline or BASELINE
    matches = [i for i in compared if rows[i].label == wanted]
    if baseline and not matches:
        labels = ", ".join(rows[i].label for i in compared)
        raise ReportError(f"--baseline {baseline!r} is not a row label; the rows are: {labels}")
    if len(matches) == 1:
        base_index = matches[0]

    all_notes = list(notes) + oracle_notes + _data_differences(runs)
    unusable = [
        rows[i].label for i, p in zip(compared, points, strict=True) if any(map(math.isnan, p))
    ]
    if unusable:
        all_notes.append("not ranked (a chosen metric is missing or NaN): " + ", ".join(unusable))
    return Report(
        rows, columns, chosen, directions, pareto, best, base_index, split, list(roots), all_notes
    )
