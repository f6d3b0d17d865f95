"""Pareto marking on hand-made metric sets: dominance, ties, NaN, minimised metrics."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.pareto import (
    default_direction,
    dominates,
    front_path,
    front_y_at,
    gains_at_equal_x,
    pareto_mask,
)

NAN = math.nan


def test_dominated_point_is_off_the_front():
    assert pareto_mask([(0.7, 0.6), (0.6, 0.5), (0.65, 0.7)], ("max", "max")) == [True, False, True]


def test_trade_off_points_are_all_optimal():
    # the seesaw: more finish costs clicks; none dominates another
    points = [(0.72, 0.60), (0.71, 0.63), (0.69, 0.66), (0.65, 0.67)]
    assert pareto_mask(points, ("max", "max")) == [True] * 4


def test_ties_and_duplicates():
    # exact duplicates do not dominate each other: both stay
    assert pareto_mask([(1, 1), (1, 1), (0, 0)], ("max", "max")) == [True, True, False]
    # equal on one metric, worse on the other: dominated
    assert pareto_mask([(1, 1), (1, 0)], ("max", "max")) == [True, False]
    # all identical: all optimal
    assert pareto_mask([(0.5, 0.5, 0.5)] * 3, ("max",) * 3) == [True] * 3


def test_single_point_and_empty():
    assert pareto_mask([(0.5, 0.1)], ("max", "max")) == [True]
    assert pareto_mask([(0.5,)], ("min",)) == [True]
    assert pareto_mask([], ("max", "max")) == []


def test_one_metric_keeps_only_the_best_and_its_ties():
    assert pareto_mask([(0.3,), (0.9,), (0.9,), (0.1,)], ("max",)) == [False, True, True, False]


def test_many_metrics():
    directions = ("max",) * 6
    base = (0.70, 0.65, 0.60, 0.80, 0.55, 0.50)
    better_everywhere = tuple(v + 0.01 for v in base)
    one_better = (*base[:5], 0.51)  # beats base on the last metric only
    specialist = (0.2, 0.2, 0.2, 0.2, 0.2, 0.9)
    mask = pareto_mask([base, better_everywhere, one_better, specialist], directions)
    assert mask == [False, True, False, True]


def test_nan_is_never_on_the_front_and_dominates_nothing():
    assert pareto_mask([(NAN, 0.9), (0.5, 0.5)], ("max", "max")) == [False, True]
    # (0.9, NaN) would beat (0.5, 0.5) on the known metric, but cannot be compared
    assert pareto_mask([(0.9, NAN), (0.5, 0.5), (0.4, 0.4)], ("max", "max")) == [
        False,
        True,
        False,
    ]
    assert pareto_mask([(NAN, NAN)], ("max", "max")) == [False]
    assert not dominates((0.9, NAN), (0.1, 0.1), ("max", "max"))
    assert not dominates((0.9, 0.9), (0.1, NAN), ("max", "max"))


def test_minimised_metric():
    # (auc, logloss): same AUC, lower logloss wins
    points = [(0.70, 0.30), (0.70, 0.50)]
    assert pareto_mask(points, ("max", "min")) == [True, False]
    assert pareto_mask(points, ("max", "max")) == [False, True]
    assert dominates((0.7, 0.3), (0.7, 0.5), ("max", "min"))
    assert not dominates((0.7, 0.5), (0.7, 0.3), ("max", "min"))


def test_dominates_needs_strictly_better_somewhere():
    assert dominates((1, 1), (1, 0), ("max", "max"))
    assert not dominates((1, 1), (1, 1), ("max", "max"))
    assert not dominates((1, 0), (0, 1), ("max", "max"))


def test_front_path_orders_by_x_and_drops_dominated_and_duplicate_points():
    xs = [0.60, 0.70, 0.65, 0.50, 0.70]
    ys = [0.70, 0.50, 0.60, 0.40, 0.50]
    assert front_path(xs, ys, ("max", "max")) == [0, 2, 1]
    # minimising y: the lowest-y point at each x; (0.50, 0.40) is now on the front
    assert front_path(xs, ys, ("max", "min")) == [3, 1]


def test_front_y_at_interpolates_inside_and_refuses_outside():
    front = [(0.75, 0.55), (0.60, 0.80), (0.70, 0.70)]  # any order: sorted by x first
    assert front_y_at(front, 0.65) == pytest.approx(0.75)
    assert front_y_at(front, 0.70) == pytest.approx(0.70)
    assert front_y_at(front, 0.60) == pytest.approx(0.80)  # the ends are inside
    assert front_y_at(front, 0.75) == pytest.approx(0.55)
    assert front_y_at(front, 0.59) is None and front_y_at(front, 0.76) is None
    assert front_y_at([(0.5, 0.4)], 0.5) == 0.4 and front_y_at([(0.5, 0.4)], 0.6) is None
    assert front_y_at([], 0.5) is None


def test_gains_at_equal_x_on_hand_made_points():
    # a fusion run: three points on its front and one dominated, which must not count
    fusion = {"mh": [(0.60, 0.80), (0.70, 0.70), (0.65, 0.60), (0.75, 0.55)]}
    schemes = [
        ("a", 0.70, 0.60),  # fusion wins: 0.70 on the front at x = 0.70
        ("b", 0.65, 0.70),  # fusion wins, interpolated: 0.75 (not the dominated 0.60)
        ("c", 0.72, 0.75),  # fusion loses: 0.70 + (0.55 - 0.70) * 0.4 = 0.64
        ("d", 0.80, 0.50),  # outside the front's x-range [0.60, 0.75]: not comparable
        ("e", 0.55, 0.90),  # outside on the other side
        ("nan", NAN, 0.9),  # left out
    ]
    got = {g.point: g for g in gains_at_equal_x(schemes, fusion, ("max", "max"))}
    assert set(got) == {"a", "b", "c", "d", "e"}
    assert got["a"].gain == pytest.approx(0.10) and got["a"].front_y == pytest.approx(0.70)
    assert got["b"].gain == pytest.approx(0.05) and got["b"].front_y == pytest.approx(0.75)
    assert got["c"].gain == pytest.approx(-0.11) and got["c"].front_y == pytest.approx(0.64)
    for name in ("d", "e"):
        assert got[name].gain is None and got[name].front_y is None
        assert got[name].span == (0.60, 0.75) and got[name].front == "mh"
    # y minimised (e.g. logloss): a front that trades more x for more y; lower y is a gain
    logloss = {"mh": [(0.60, 0.30), (0.70, 0.40), (0.80, 0.60), (0.70, 0.50)]}
    got = gains_at_equal_x([("a", 0.65, 0.40), ("c", 0.75, 0.45)], logloss, ("max", "min"))
    assert [g.front_y for g in got] == [pytest.approx(0.35), pytest.approx(0.50)]
    assert [g.gain for g in got] == [pytest.approx(0.05), pytest.approx(-0.05)]
    # two fronts: one comparison per scheme and front
    fronts = {**fusion, "mmoe": [(0.5, 0.7), (0.9, 0.3)]}
    got = gains_at_equal_x(schemes[:1], fronts, ("max", "max"))
    assert [(g.front, round(g.gain, 6)) for g in got] == [("mh", 0.1), ("mmoe", -0.1)]
    assert gains_at_equal_x(schemes, {"empty": [(NAN, 0.5)]}, ("max", "max")) == []


def test_default_directions():
    assert default_direction("auc") == "max"
    assert default_direction("watch_time/xauc") == "max"
    assert default_direction("click/gauc") == "max"
    assert default_direction("click/logloss") == "min"
    assert default_direction("click/oracle_logloss") == "min"
    with pytest.raises(ValueError, match=r"calibration.*click/calibration:min"):
        default_direction("click/calibration")


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="direction must be one of"):
        pareto_mask([(1, 2)], ("max", "up"))
    with pytest.raises(ValueError, match="point 1 has 1 values but 2 directions"):
        pareto_mask([(1, 2), (1,)], ("max", "max"))


# Values on a coarse grid so that ties are common.
grid = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, NAN])


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda m: st.tuples(
            st.lists(st.tuples(*[grid] * m), max_size=12),
            st.tuples(*[st.sampled_from(["max", "min"])] * m),
        )
    )
)
def test_front_is_exactly_the_undominated_points(case):
    points, directions = case
    mask = pareto_mask(points, directions)
    for i, p in enumerate(points):
        undominated = not any(dominates(q, p, directions) for q in points)
        ok = not any(math.isnan(v) for v in p)
        assert mask[i] == (ok and undominated)
    # every comparable point off the front is beaten by a point on it (dominance is transitive)
    for i, p in enumerate(points):
        if not mask[i] and not any(math.isnan(v) for v in p):
            assert any(mask[j] and dominates(points[j], p, directions) for j in range(len(points)))
    # minimising a metric is maximising its negation
    flipped = [
        tuple(-v if d == "min" else v for v, d in zip(p, directions, strict=True)) for p in points
    ]
    assert pareto_mask(flipped, ("max",) * len(directions)) == mask
