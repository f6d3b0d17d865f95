"""Pareto marking over chosen metrics: pure functions on plain numbers, no I/O.

A point dominates another when it is at least as good on every metric and strictly better on
one; the Pareto-optimal points are those nothing dominates. Each metric has a direction
(`max`: AUC, GAUC, XAUC; `min`: logloss), so a minimised metric needs no sign flipping by the
caller. Conventions, chosen so a report never hides or invents a winner:

* tied or duplicate points do not dominate each other: all copies stay on the front;
* a point with a NaN in any chosen metric is not comparable: it is never on the front and
  dominates nothing (a metric that is undefined, e.g. one class only, cannot be ranked).

`gains_at_equal_x` compares single points with a front at the same x (the report's verdict:
a weighting scheme against a multi-task run's fusion front): piecewise-linear between front
points, never extrapolated past the front's ends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

from train.layout import NDCG_METRIC

Direction = Literal["max", "min"]
DIRECTIONS: tuple[str, ...] = ("max", "min")

# Directions of the metrics the job writes; calibration (ideal 1) has none, so it can only be
# chosen with an explicit direction.
METRIC_DIRECTIONS: dict[str, Direction] = {
    "auc": "max",
    "gauc": "max",
    "xauc": "max",
    "logloss": "min",
}


def default_direction(metric: str) -> Direction:
    """The direction of a metric name such as `auc` or `click/logloss` (the last part counts)."""
    name = metric.rsplit("/", 1)[-1].removeprefix("oracle_").removeprefix("head_")
    if NDCG_METRIC.fullmatch(name):
        return "max"
    if name not in METRIC_DIRECTIONS:
        raise ValueError(
            f"metric {metric!r} has no default direction (known: {sorted(METRIC_DIRECTIONS)}); "
            "give one explicitly, e.g. 'click/calibration:min'"
        )
    return METRIC_DIRECTIONS[name]


def _check(points: Sequence[Sequence[float]], directions: Sequence[str]) -> None:
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {d!r}")
    for i, point in enumerate(points):
        if len(point) != len(directions):
            raise ValueError(
                f"point {i} has {len(point)} values but {len(directions)} directions were given"
            )


def _oriented(point: Sequence[float], directions: Sequence[str]) -> tuple[float, ...]:
    """Values turned so that larger is better on every metric."""
    return tuple(
        float(v) if d == "max" else -float(v) for v, d in zip(point, directions, strict=True)
    )


def comparable(point: Sequence[float]) -> bool:
    """False when any value is NaN (see the module docstring)."""
    return not any(math.isnan(float(v)) for v in point)


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """True when `a` is at least as good as `b` everywhere and strictly better somewhere.
    A point holding a NaN neither dominates nor is dominated."""
    _check([a, b], directions)
    if not (comparable(a) and comparable(b)):
        return False
    oa, ob = _oriented(a, directions), _oriented(b, directions)
    return all(x >= y for x, y in zip(oa, ob, strict=True)) and any(
        x > y for x, y in zip(oa, ob, strict=True)
    )


def pareto_mask(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[bool]:
    """For each point, whether it is Pareto-optimal among `points` (O(n²·m): sweeps hold
    tens of runs, not millions)."""
    _check(points, directions)
    ok = [comparable(p) for p in points]
    oriented = [_oriented(p, directions) if c else () for p, c in zip(points, ok, strict=True)]
    mask = []
    for i, pi in enumerate(oriented):
        if not ok[i]:
            mask.append(False)
            continue
        beaten = any(
            ok[j]
            and all(x >= y for x, y in zip(pj, pi, strict=True))
            and any(x > y for x, y in zip(pj, pi, strict=True))
            for j, pj in enumerate(oriented)
            if j != i
        )
        mask.append(not beaten)
    return mask


def front_path(xs: Sequence[float], ys: Sequence[float], directions: tuple[str, str]) -> list[int]:
    """Indices of the two-metric Pareto front of (x, y), ordered by x, for drawing the front
    as a line (duplicates are kept once)."""
    points = list(zip(xs, ys, strict=True))
    mask = pareto_mask(points, directions)
    seen: set[tuple[float, float]] = set()
    path = []
    for i in sorted((i for i, m in enumerate(mask) if m), key=lambda i: (xs[i], ys[i])):
        if points[i] not in seen:
            seen.add(points[i])
            path.append(i)
    return path


def front_y_at(front: Sequence[tuple[float, float]], x: float) -> float | None:
    """y of the piecewise-linear curve through `front` (points sorted by x) at `x`, or None when
    `x` lies outside the points' x-range: past its ends a front says nothing, so no
    extrapolation."""
    points = sorted(front)
    if not points or not points[0][0] <= x <= points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1]  # a single point, hit exactly


@dataclass(frozen=True)
class EqualX:
    """One point (a weighting scheme) against one front (a multi-task run's fusion points) at
    the point's x."""

    point: str
    front: str
    x: float
    y: float
    front_y: float | None
    """The front interpolated at `x`; None: `x` is outside the front's x-range."""
    span: tuple[float, float]
    """The front's x-range."""
    gain: float | None
    """`front_y - y`, turned by y's direction so that positive means the front is better; None
    when not comparable."""


def gains_at_equal_x(
    points: Sequence[tuple[str, float, float]],
    fronts: Mapping[str, Sequence[tuple[float, float]]],
    directions: tuple[str, str],
) -> list[EqualX]:
    """For every named point (x, y) and every named set of points: the set's two-metric Pareto
    front (`front_path`), interpolated piecewise-linearly at the point's x, against the point's
    y. "At equal x" is this interpolation: dominated points of a set never count, and a point
    whose x lies outside a front's x-range is not comparable with it (gain None). Points or
    set members with a NaN are left out."""
    _check([], directions)
    out = []
    for name, x, y in points:
        if math.isnan(x) or math.isnan(y):
            continue
        for front_name, members in fronts.items():
            usable = [(a, b) for a, b in members if comparable((a, b))]
            if not usable:
                continue
            xs, ys = [a for a, _ in usable], [b for _, b in usable]
            front = [(xs[i], ys[i]) for i in front_path(xs, ys, directions)]
            at = front_y_at(front, x)
            gain = None
            if at is not None:
                gain = at - y if directions[1] == "max" else y - at
            span = (front[0][0], front[-1][0])
            out.append(EqualX(name, front_name, x, y, at, span, gain))
    return out
