"""Per-user NDCG@k (train.metrics.ndcg): a hand computation, sklearn's `ndcg_score` on random
groups with ties, the users that count, k beyond a group, graded gains from a weight scheme,
and the keys `BehaviourMetrics` logs. DDP (uneven and empty shards) is covered by
tests/test_metrics.py's two-rank test, which compares `click/ndcg@10` and a graded NDCG too."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score

from train.metrics import BehaviourMetrics, grouped_ndcg, ndcg, scheme_gains
from train.objective import Evaluation
from train.weights import SchemeError, build_scheme

SEED = build_scheme(
    label="click",
    terms=[
        {"behaviour": "click", "coef": 1},
        {"behaviour": "finish", "coef": 3},
        {"behaviour": "watch_time", "coef": 5, "transform": "threshold", "threshold": 30},
    ],
    name="seed",
)  # conf/weights/seed.yaml, built without composing Hydra
NAMES = ("click", "finish", "watch_time")


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_hand_computed_example() -> None:
    # user 7: scores 0.9 0.8 0.7 0.1, gains 0 1 0 1 -> positives at ranks 2 and 4
    #   DCG = 1/log2(3) + 1/log2(5) = 0.630930 + 0.430677 = 1.061606
    #   IDCG = 1 + 1/log2(3) = 1.630930                  -> NDCG = 0.650921
    #   @2: DCG = 0.630930, IDCG = 1.630930              -> NDCG = 0.386853
    # user 3: scores 0.5 0.5 0.2, gains 1 0 0: the tie shares ranks 1-2, each row gaining the
    #   block's mean 0.5: DCG = 0.5 * (1 + 0.630930) = 0.815465, IDCG = 1 -> NDCG = 0.815465
    #   (either order of the tie: 1 or 0.630930; their mean)
    # user 9: no positive -> not counted
    scores = t([0.9, 0.5, 0.8, 0.5, 0.7, 0.3, 0.1, 0.2, 0.6])
    gains = t([0, 1, 1, 0, 0, 0, 1, 0, 0])
    groups = torch.tensor([7, 3, 7, 3, 7, 9, 7, 3, 9])
    value, counts = grouped_ndcg(scores, gains, groups, k=10)
    assert counts.tolist() == [True, True, False]  # users 3, 7, 9
    torch.testing.assert_close(value[:2], t([0.815465, 0.650921]), atol=1e-6, rtol=0)
    assert math.isnan(value[2])
    assert ndcg(scores, gains, groups, k=10).item() == pytest.approx(
        (0.815465 + 0.650921) / 2, abs=1e-6
    )
    assert ndcg(scores, gains, groups, k=2).item() == pytest.approx(
        (0.815465 + 0.386853) / 2, abs=1e-6
    )
    # k = 1: user 3's tied top block holds its positive with weight 1/2; user 7's top row is 0
    assert ndcg(scores, gains, groups, k=1).item() == pytest.approx((0.5 + 0.0) / 2, abs=1e-12)


def sklearn_mean(scores: np.ndarray, gains: np.ndarray, groups: np.ndarray, k: int) -> float:
    """The reference: sklearn per user (ignore_ties=False), mean over users with a gain > 0."""
    values = []
    for user in np.unique(groups):
        mine = groups == user
        if not gains[mine].sum() > 0:
            continue
        if mine.sum() == 1:  # sklearn refuses one document; it is ranked first, ideally
            values.append(1.0)
            continue
        values.append(ndcg_score(gains[mine][None], scores[mine][None], k=k))
    return float(np.mean(values)) if values else math.nan


def test_matches_sklearn_on_random_groups_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(1, 80))
        k = int(rng.integers(1, 15))
        groups = rng.integers(-3, 6, n) * 1_000_003
        scores = rng.integers(0, 5, n) / 4  # five levels: many ties, within and across users
        gains = rng.integers(0, 4, n) * (rng.random(n) < 0.4) * rng.random(n).round(2)
        got = ndcg(torch.from_numpy(scores), torch.from_numpy(gains), torch.from_numpy(groups), k)
        expected = sklearn_mean(scores, gains, groups, k)
        if math.isnan(expected):
            assert math.isnan(got.item())
        else:
            assert got.item() == pytest.approx(expected, abs=1e-12, rel=0)


def test_row_order_and_group_ids_do_not_matter() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    scores = torch.from_numpy(rng.integers(0, 20, n) / 20)
    gains = torch.from_numpy((rng.random(n) < 0.2).astype(np.float64))
    groups = torch.from_numpy(rng.integers(0, 300, n))
    base = ndcg(scores, gains, groups, 5)
    perm = torch.from_numpy(rng.permutation(n))
    assert ndcg(scores[perm], gains[perm], groups[perm], 5).item() == pytest.approx(
        base.item(), abs=1e-12
    )
    assert ndcg(scores, gains, groups * 7 - 2**40, 5).item() == pytest.approx(
        base.item(), abs=1e-12
    )


def test_users_without_a_positive_are_left_out() -> None:
    scores, groups = t([0.9, 0.1, 0.8, 0.2]), torch.tensor([1, 1, 2, 2])
    # user 1 ranks its positive first (1.0); user 2 has none: the mean is 1.0, not 0.5
    assert ndcg(scores, t([1, 0, 0, 0]), groups).item() == 1.0
    assert math.isnan(ndcg(scores, t([0, 0, 0, 0]), groups).item())
    assert math.isnan(ndcg(t([]), t([]), torch.tensor([], dtype=torch.long)).item())


def test_k_beyond_a_group_is_the_whole_group() -> None:
    rng = np.random.default_rng(2)
    scores, gains = rng.random(12).round(1), (rng.random(12) < 0.5) * 1.0
    gains[0] = 1.0
    groups = np.zeros(12, dtype=np.int64)
    args = torch.from_numpy(scores), torch.from_numpy(gains), torch.from_numpy(groups)
    full = ndcg_score(gains[None], scores[None])
    assert ndcg(*args, k=12).item() == pytest.approx(full, abs=1e-12)
    assert ndcg(*args, k=1000).item() == pytest.approx(full, abs=1e-12)


def test_nan_score_of_a_counted_user_is_nan() -> None:
    scores, groups = t([math.nan, 0.1, 0.8, 0.2]), torch.tensor([1, 1, 2, 2])
    assert math.isnan(ndcg(scores, t([1, 0, 1, 0]), groups).item())
    # ... but not when that user does not count
    assert ndcg(scores, t([0, 0, 1, 0]), groups).item() == 1.0


def test_bad_k_is_refused() -> None:
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            ndcg(t([0.1]), t([1]), torch.tensor([0]), k=k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ndcg_k must be an integer >= 1"):
        Evaluation(ndcg_k=0)
    with pytest.raises(ValueError, match="ndcg_k must be an integer >= 1 or None"):
        BehaviourMetrics(NAMES, ("watch_time",), "click", ndcg_k=0)


def test_seed_gains_grade_a_finish_above_a_click() -> None:
    behaviours = t(
        [
            [1, 1, 40],  # click, finish, long watch: 1 + 3 + 5
            [1, 1, 10],  # click, finish: 1 + 3
            [1, 0, 0],  # click: 1
            [0, 1, 40],  # no click: a negative of the scheme, gain 0
            [0, 0, 0],
        ]
    ).reshape(-1, 3)
    gains = scheme_gains(SEED, behaviours, NAMES)
    assert gains.tolist() == [9.0, 4.0, 1.0, 0.0, 0.0]

    # one user: a click only and a click + finish; ranking the finish first is ideal
    groups = torch.tensor([0, 0, 0])
    rows = behaviours[1:4]
    finish_first = ndcg(t([0.9, 0.5, 0.1]), scheme_gains(SEED, rows, NAMES), groups).item()
    click_first = ndcg(t([0.5, 0.9, 0.1]), scheme_gains(SEED, rows, NAMES), groups).item()
    assert finish_first == 1.0
    # DCG = 1 + 4/log2(3), IDCG = 4 + 1/log2(3)
    expected = (1 + 4 / math.log2(3)) / (4 + 1 / math.log2(3))
    assert click_first == pytest.approx(expected, abs=1e-12)
    # with binary gains both rankings put a positive first and second: no difference
    binary = (rows[:, 0] > 0).to(torch.float64)
    assert ndcg(t([0.9, 0.5, 0.1]), binary, groups).item() == 1.0
    assert ndcg(t([0.5, 0.9, 0.1]), binary, groups).item() == 1.0


def test_behaviour_metrics_keys_and_values() -> None:
    rng = np.random.default_rng(3)
    n = 400
    click = (rng.random(n) < 0.3).astype(np.float32)
    finish = click * (rng.random(n) < 0.5)
    watch = click * rng.integers(0, 60, n)
    behaviours = torch.from_numpy(np.stack([click, finish, watch], 1).astype(np.float32))
    probs = torch.from_numpy((rng.integers(0, 10, n) / 10).astype(np.float32))
    groups = torch.from_numpy(rng.integers(0, 40, n))
    oracle = torch.from_numpy(rng.random((n, 1)).astype(np.float32))

    plain = BehaviourMetrics(NAMES, ("watch_time",), "click", ("click",), ndcg_k=3)
    plain.update(probs, behaviours, groups, oracle)
    out = plain.compute()
    assert {k for k in out if "ndcg" in k} == {"click/ndcg@3", "click/oracle_ndcg@3"}
    assert out["click/ndcg@3"] == ndcg(probs, behaviours[:, 0], groups, 3).item()
    assert out["click/oracle_ndcg@3"] == ndcg(oracle[:, 0], behaviours[:, 0], groups, 3).item()

    graded = BehaviourMetrics(NAMES, ("watch_time",), "click", ndcg_gain=SEED)
    graded.update(probs, behaviours, groups)
    out = graded.compute()
    assert [k for k in out if "ndcg" in k] == ["click/ndcg_seed@10"]
    gains = scheme_gains(SEED, behaviours.to(torch.float64), NAMES)
    assert out["click/ndcg_seed@10"] == ndcg(probs, gains, groups, 10).item()
    expected = sklearn_mean(probs.double().numpy(), gains.numpy(), groups.numpy(), 10)
    assert out["click/ndcg_seed@10"] == pytest.approx(expected, abs=1e-12)

    off = BehaviourMetrics(NAMES, ("watch_time",), "click", ndcg_k=None)
    off.update(probs, behaviours, groups)
    assert not any("ndcg" in k for k in off.compute())

    with pytest.raises(SchemeError, match="reads behaviour 'finish'"):
        BehaviourMetrics(("click", "like"), (), "click", ndcg_gain=SEED)
