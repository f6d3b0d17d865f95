"""Row sources: the functions that turn runs into the points of the comparison.

A row source is a function `(runs, split) -> list[Row]` (`RowSource`): it picks the runs it
understands and returns one `train.layout.Row` per point, with its own `kind`, a readable
`label` and `values` keyed `"<behaviour>/<metric>"`. Here: `scheme_rows` (one row per
sample-weighting run) and `oracle_row` (the simulator's truth, never ranked); the fusion sweep
of multi-head runs is `train.report.fusion.fusion_rows`. `table.ROW_SOURCES` lists the sources
a report uses by default; a new kind of row needs only a new function there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from train.layout import Row, Run
from train.report.labels import label_runs, sort_key
from train.report.runs import split_values

RowSource = Callable[[Sequence[Run], str], list[Row]]


def is_scheme_run(run: Run) -> bool:
    """Whether `scheme_rows` reports this run: one with a weights config, except multi-task runs
    (saved per-head predictions, or a model with heads), which `fusion.fusion_rows` reports."""
    return bool(run.weights) and not run.is_multitask


def scheme_rows(runs: Sequence[Run], split: str) -> list[Row]:
    """One row per sample-weighting run, labelled by its scheme and changed knobs."""
    mine = [r for r in runs if is_scheme_run(r)]
    labels = label_runs(mine)
    order = sorted(range(len(mine)), key=lambda i: sort_key(mine[i], labels[i]))
    return [
        Row(labels[i], "scheme", split_values(mine[i].metrics, split, False), mine[i].url)
        for i in order
    ]


def oracle_row(runs: Sequence[Run], split: str) -> tuple[Row | None, list[str]]:
    """The oracle (the simulator's true probabilities scored like a model), or None on data
    without one. Runs on the same data share it; if they disagree, the runs saw different test
    data and the note says so."""
    found = [v for v in (split_values(r.metrics, split, True) for r in runs) if v]
    if not found:
        return None, []
    columns = sorted(set().union(*found))
    values, notes = {}, []
    differs = []
    for c in columns:
        seen = [v[c] for v in found if c in v and not math.isnan(v[c])]
        values[c] = sum(seen) / len(seen) if seen else math.nan
        if seen and max(seen) - min(seen) > 1e-9:
            differs.append(c)
    label = "oracle"
    if differs:
        label = "oracle (mean)"
        shown = ", ".join(differs[:4]) + (", ..." if len(differs) > 4 else "")
        if all(c.endswith("/xauc") for c in differs):
            notes.append(
                f"the oracle's XAUC differs between runs ({shown}): XAUC is estimated on random "
                "pairs drawn with the run's `seed`, so XAUC differences of that size are noise; "
                "the oracle row is the mean"
            )
        else:
            notes.append(
                f"the oracle's metrics differ between runs ({shown}): the runs were evaluated "
                "on different test data, so their rows are not directly comparable; the oracle "
                "row is the mean"
            )
    return Row(label, "oracle", values), notes
