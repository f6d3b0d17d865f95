"""What the plot and the verdict show, computed without drawing anything: the series of points
(the weighting schemes, and each multi-task run's fusion points), which points of each panel get
a text label and which a number (the key in report.md), and the verdict of each metric pair.

Readability rule of `pareto.png`: in the panel of a metric pair only the points on that pair's
Pareto front (over every non-oracle row) carry their label as text; every other point carries a
small number, the same in every panel, which the key in report.md turns back into its label.
A sweep of dozens of fusion points then shows a handful of labels per panel, not a pile.

Verdict of a pair (x = the first chosen metric, y = another): the rows on the pair's front, and
the weighting schemes against each multi-task run's fusion front at equal x
(`train.pareto.gains_at_equal_x`: the run's front interpolated at the scheme's x, "not
comparable" outside the front's x-range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

from train.pareto import EqualX, gains_at_equal_x, pareto_mask
from train.report.table import Report

SCHEMES = "schemes"
"""The series name of the weighting schemes' rows."""


@dataclass(frozen=True)
class Series:
    """Points drawn alike and joined into one front: one kind of row, or one multi-task run."""

    name: str
    kind: str
    rows: tuple[int, ...]


@dataclass(frozen=True)
class Panel:
    """One metric pair of the plot: the rows drawn, which carry text and which a number."""

    x: int
    y: int
    """Indices into `Report.chosen`."""
    labelled: tuple[int, ...]
    """Rows on the pair's Pareto front (over every non-oracle row): drawn with their label."""
    numbered: tuple[int, ...]
    """The other rows drawn: drawn with their number (`Layout.numbers`)."""


@dataclass(frozen=True)
class Layout:
    series: tuple[Series, ...]
    panels: tuple[Panel, ...]
    numbers: dict[int, int]
    """Row index -> the number beside its point, for every row numbered in some panel (1, 2,
    ... in table order), so a point has one number in every panel."""


@dataclass(frozen=True)
class Verdict:
    """One pair (x = the first chosen metric): its front, and fusion against schemes at equal x."""

    x: str
    y: str
    front: tuple[int, ...]
    """Rows on the pair's front, in table order."""
    comparisons: tuple[EqualX, ...]
    """Every scheme against every multi-task run's fusion front (`point`/`front`: the labels
    of the scheme and the series)."""

    @property
    def fusion_best(self) -> EqualX | None:
        """The largest gain of a fusion front over a scheme, if any front beats one."""
        won = [c for c in self.comparisons if c.gain is not None and c.gain > 0]
        return max(won, key=lambda c: c.gain or 0.0) if won else None

    @property
    def scheme_best(self) -> EqualX | None:
        """The largest gain of a scheme over a fusion front, if any scheme beats one."""
        lost = [c for c in self.comparisons if c.gain is not None and c.gain < 0]
        return min(lost, key=lambda c: c.gain or 0.0) if lost else None

    @property
    def not_comparable(self) -> tuple[EqualX, ...]:
        return tuple(c for c in self.comparisons if c.gain is None)


def series_of(report: Report) -> list[Series]:
    """The schemes first, then each row source's series in the order its rows come."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(report.rows):
        if row.kind == "oracle":
            continue
        name = row.series or (SCHEMES if row.kind == "scheme" else row.kind)
        groups.setdefault((row.kind, name), []).append(i)
    return [Series(name, kind, tuple(rows)) for (kind, name), rows in groups.items()]


def _value(report: Report, i: int, column: str) -> float:
    return report.rows[i].values.get(column, math.nan)


def pair_front(report: Report, a: int, b: int) -> tuple[list[int], list[int]]:
    """The non-oracle rows with both metrics of the pair, split into those on the pair's Pareto
    front and the others (both in table order)."""
    ca, cb = report.chosen[a], report.chosen[b]
    drawn = [
        i
        for i, r in enumerate(report.rows)
        if r.kind != "oracle"
        and not (math.isnan(_value(report, i, ca)) or math.isnan(_value(report, i, cb)))
    ]
    points = [(_value(report, i, ca), _value(report, i, cb)) for i in drawn]
    mask = pareto_mask(points, (report.directions[a], report.directions[b]))
    on = [i for i, m in zip(drawn, mask, strict=True) if m]
    return on, [i for i, m in zip(drawn, mask, strict=True) if not m]


def layout(report: Report) -> Layout:
    """Series, and for every pair of chosen metrics the rows drawn with text or a number."""
    panels = []
    for a, b in combinations(range(len(report.chosen)), 2):
        on, off = pair_front(report, a, b)
        panels.append(Panel(a, b, tuple(on), tuple(off)))
    # Every drawn row has a number: a front point whose label cannot be placed clear of the
    # others shows its number instead (`train.report.plot`), so the key covers it too.
    numbered = sorted({i for p in panels for i in (*p.labelled, *p.numbered)})
    numbers = {i: n for n, i in enumerate(numbered, start=1)}
    return Layout(tuple(series_of(report)), tuple(panels), numbers)


def verdicts(report: Report) -> list[Verdict]:
    """One verdict per pair (the first chosen metric, another chosen metric)."""
    out = []
    series = series_of(report)
    schemes = [s for s in series if s.kind == "scheme"]
    fusions = [s for s in series if s.kind == "fusion"]
    for b in range(1, len(report.chosen)):
        cx, cy = report.chosen[0], report.chosen[b]
        on, _ = pair_front(report, 0, b)
        points = [
            (report.rows[i].label, _value(report, i, cx), _value(report, i, cy))
            for s in schemes
            for i in s.rows
        ]
        fronts = {
            s.name: [(_value(report, i, cx), _value(report, i, cy)) for i in s.rows]
            for s in fusions
        }
        directions = (report.directions[0], report.directions[b])
        comparisons = gains_at_equal_x(points, fronts, directions)
        out.append(Verdict(cx, cy, tuple(on), tuple(comparisons)))
    return out
