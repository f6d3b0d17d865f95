"""Exact ranking metrics for per-behaviour evaluation of the ranking model.

Every metric here is exact (rank based, no thresholds or histogram bins), vectorised in torch and
runs on whatever device its inputs live on.  The only approximation is XAUC on large inputs,
where a seeded, stated number of pairs is sampled.

Functional API (1-D inputs of equal length, 0-dim float64 results, NaN when undefined):
:func:`auc`, :func:`grouped_auc`, :func:`gauc`, :func:`ndcg`, :func:`grouped_ndcg`,
:func:`xauc`, :func:`calibration`, :func:`logloss`.  Metric classes for accumulation and DDP
sync: :class:`GroupAUC`, :class:`XAUC`, :class:`BehaviourMetrics`.

Longer than 450 lines because the Metric classes must give exactly the functional results once
gathered over ranks (the report recomputes them from saved predictions and compares): the two
halves are read and changed together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from train.calibration import OddsCorrection
from train.weights import WeightScheme

__all__ = [
    "XAUC",
    "BehaviourMetrics",
    "GroupAUC",
    "auc",
    "calibration",
    "gauc",
    "grouped_auc",
    "grouped_ndcg",
    "logloss",
    "ndcg",
    "scheme_gains",
    "xauc",
]

_EPS = 1e-7
# Upper bound on the number of pair comparisons held in memory at once by xauc (about 32 MiB per
# float64 temporary); module level so tests can shrink it to exercise chunking.
_PAIR_CHUNK = 1 << 22


def _check_1d(**tensors: Tensor) -> int:
    sizes = set()
    for name, t in tensors.items():
        if t.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        sizes.add(t.shape[0])
    if len(sizes) > 1:
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        raise ValueError(f"inputs must have equal length, got {shapes}")
    return sizes.pop()


def _nan(device: torch.device) -> Tensor:
    return torch.tensor(math.nan, dtype=torch.float64, device=device)


# --------------------------------------------------------------------------------------------
# AUC via average ranks
# --------------------------------------------------------------------------------------------


def _tie_blocks(g: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """First and last sorted position of the tie block of every row of rows sorted by
    (group ``g``, score ``s``).

    Tie blocks are runs of equal (group, score); a group change always opens a new block so
    that ties are never shared across groups.
    """
    n = g.numel()
    device = g.device
    starts = torch.ones(n, dtype=torch.bool, device=device)
    starts[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    ends = torch.ones(n, dtype=torch.bool, device=device)
    ends[:-1] = starts[1:]
    pos = torch.arange(n, device=device)
    first = torch.cummax(torch.where(starts, pos, 0), 0).values
    last = torch.cummin(torch.where(ends, pos, n - 1).flip(0), 0).values.flip(0)
    return first, last


def _group_sizes(inverse: Tensor, n_groups: int) -> Tensor:
    counts = torch.zeros(n_groups, dtype=torch.long, device=inverse.device)
    return counts.scatter_add_(0, inverse, torch.ones_like(inverse))


def _group_starts(inverse: Tensor, n_groups: int) -> Tensor:
    """Sorted position of every group's first row once rows are sorted by group index."""
    counts = _group_sizes(inverse, n_groups)
    return torch.cumsum(counts, 0) - counts


def _sort_by_group(keys: Tensor, inverse: Tensor, n_groups: int) -> Tensor:
    """The permutation sorting rows by (group, key ascending), stable."""
    order = torch.argsort(keys, stable=True)
    if n_groups > 1:
        # A stable sort by group after a sort by key is a lexicographic sort by (group, key).
        order = order[torch.argsort(inverse[order], stable=True)]
    return order


def _tie_positions(scores: Tensor, inverse: Tensor, n_groups: int) -> Tensor:
    """[rows, 2] int64: the 0-based ascending positions within its group of the first and the
    last row of every row's tie block, in the input row order; the one sort that AUC, GAUC and
    NDCG share.  ``inverse`` holds dense group indices in ``[0, n_groups)``."""
    order = _sort_by_group(scores, inverse, n_groups)
    g = inverse[order]
    first, last = _tie_blocks(g, scores[order])
    start = _group_starts(inverse, n_groups)[g]
    sorted_positions = torch.stack([first - start, last - start], dim=1)
    index = order[:, None].expand(-1, 2)
    return torch.empty_like(sorted_positions).scatter_(0, index, sorted_positions)


def _ranks_from_positions(positions: Tensor, scores: Tensor) -> Tensor:
    """1-based rank of every score within its group, ties sharing their average rank (float64;
    half-integers, so sums stay exact), NaN where the score is NaN."""
    ranks = positions.sum(1).to(torch.float64) / 2 + 1
    # NaN compares unequal to itself, so NaN rows got arbitrary ranks; make that visible instead.
    return torch.where(torch.isnan(scores), math.nan, ranks)


def _average_ranks(scores: Tensor, inverse: Tensor, n_groups: int) -> Tensor:
    """1-based rank of every score within its group, ties sharing their average rank, in the
    input row order (see :func:`_ranks_from_positions`)."""
    return _ranks_from_positions(_tie_positions(scores, inverse, n_groups), scores)


def _auc_from_ranks(
    ranks: Tensor, positive: Tensor, inverse: Tensor, n_groups: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Mann–Whitney AUC per group from within-group average ranks."""
    device = ranks.device

    def per_group(values: Tensor) -> Tensor:
        # scatter_add_ rather than bincount(weights=...): the latter has no deterministic CUDA
        # kernel and would fail under torch.use_deterministic_algorithms(True).
        out = torch.zeros(n_groups, dtype=torch.float64, device=device)
        return out.scatter_add_(0, inverse, values)

    pos = positive.to(torch.float64)
    n_rows = per_group(torch.ones_like(pos))
    n_pos = per_group(pos)
    rank_sum = per_group(torch.where(positive, ranks, 0.0))
    has_nan = per_group(torch.isnan(ranks).to(torch.float64)) > 0
    n_neg = n_rows - n_pos
    both = (n_pos > 0) & (n_neg > 0)
    u = rank_sum - n_pos * (n_pos + 1) / 2
    auc_g = torch.where(both & ~has_nan, u / (n_pos * n_neg), math.nan)
    return auc_g, n_rows.to(torch.long), both


def _weighted_gauc(auc_g: Tensor, n_rows: Tensor, both: Tensor) -> Tensor:
    weight = torch.where(both, n_rows.to(torch.float64), 0.0)
    # NaN AUCs of groups with both classes (NaN scores) must propagate, the others must not.
    num = torch.where(both, weight * auc_g, 0.0).sum()
    den = weight.sum()
    return torch.where(den > 0, num / den, math.nan)


def auc(preds: Tensor, target: Tensor) -> Tensor:
    """Exact ROC AUC; ``target > 0`` is positive, tied scores count 1/2 (Mann–Whitney U).

    NaN if only one class is present or any score is NaN.
    """
    n = _check_1d(preds=preds, target=target)
    inverse = torch.zeros(n, dtype=torch.long, device=preds.device)
    ranks = _average_ranks(preds.to(torch.float64), inverse, 1)
    return _auc_from_ranks(ranks, target > 0, inverse, 1)[0][0]


def grouped_auc(preds: Tensor, target: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact AUC of every group (e.g. user / request) in one vectorised pass.

    Groups are arbitrary int64 ids, reported in ``torch.unique`` (ascending id) order.

    Returns:
        ``(auc_per_group, n_rows_per_group, has_both_classes)``: float64 AUCs (NaN for groups
        holding a single class or a NaN score), int64 row counts and a bool mask.
    """
    _check_1d(preds=preds, target=target, groups=groups)
    uniq, inverse = torch.unique(groups, return_inverse=True)
    ranks = _average_ranks(preds.to(torch.float64), inverse, uniq.numel())
    return _auc_from_ranks(ranks, target > 0, inverse, uniq.numel())


def gauc(preds: Tensor, target: Tensor, groups: Tensor) -> Tensor:
    """Group AUC: mean of per-group AUCs weighted by group size.

    Only groups holding both classes count, since AUC is undefined for the others; NaN if no
    group does.
    """
    return _weighted_gauc(*grouped_auc(preds, target, groups))


# --------------------------------------------------------------------------------------------
# NDCG@k per group
# --------------------------------------------------------------------------------------------


def _discount_sums(k: int, device: torch.device) -> Tensor:
    """``D[m] = Σ_{j<m} 1 / log2(j + 2)`` for ``m`` in ``[0, k]``: the discount of the 0-based
    positions ``[a, b)`` within the top k is ``D[min(b, k)] - D[min(a, k)]``."""
    table = torch.zeros(k + 1, dtype=torch.float64, device=device)
    positions = torch.arange(k, dtype=torch.float64, device=device)
    table[1:] = torch.cumsum(1.0 / torch.log2(positions + 2), 0)
    return table


def _ndcg_per_group(
    positions: Tensor, scores: Tensor, gains: Tensor, inverse: Tensor, n_groups: int, k: int
) -> tuple[Tensor, Tensor]:
    """NDCG@k of every group and whether it counts (ideal DCG > 0), from the scores' ascending
    tie positions (:func:`_tie_positions`); see :func:`ndcg`.

    Only rows with a positive gain add to DCG and ideal DCG, so past one pass over the rows
    everything runs on those (a few percent of a feed): the sort of the scores is the one GAUC
    already made."""
    device = scores.device
    table = _discount_sums(k, device)

    def per_group(g: Tensor, values: Tensor) -> Tensor:
        return torch.zeros(n_groups, dtype=torch.float64, device=device).scatter_add_(0, g, values)

    chosen = torch.nonzero(gains > 0).squeeze(1)
    gain, g = gains[chosen], inverse[chosen]
    # DCG by descending score: a tie block at ascending positions [first, last] of a group of n
    # rows sits at descending positions [n-1-last, n-1-first].  Each of its rows takes the
    # block's summed discount over its size: the block's mean gain times the discounts of the
    # positions it occupies, i.e. the mean over every order of the tied rows.
    size = _group_sizes(inverse, n_groups)[g]
    first, last = positions[chosen].unbind(1)
    discount = table[(size - first).clamp(max=k)] - table[(size - 1 - last).clamp(max=k)]
    dcg = per_group(g, gain * discount / (last - first + 1).to(torch.float64))

    # Ideal DCG: the positive gains sorted descending within their group.
    if len(gain) == 0 or bool((gain == gain[0]).all()):
        # One gain value (binary relevance): the first min(positives, k) discounts, no sort.
        positives = per_group(g, torch.ones_like(gain)).to(torch.long)
        ideal = table[positives.clamp(max=k)] * (gain[0] if len(gain) else 0.0)
    else:
        order = torch.argsort(-gain, stable=True)
        # By group as float64 (exact below 2**53 groups): torch's CPU stable sort of int64
        # keys costs ~0.3 s however few the rows.
        order = order[torch.argsort(g[order].to(torch.float64), stable=True)]
        g_sorted = g[order]
        position = torch.arange(len(order), device=device) - _group_starts(g, n_groups)[g_sorted]
        position = position.to(torch.float64)
        ideal_discount = torch.where(position < k, 1.0 / torch.log2(position + 2.0), 0.0)
        ideal = per_group(g_sorted, gain[order] * ideal_discount)

    counts = ideal > 0
    nan_rows = torch.nonzero(torch.isnan(scores)).squeeze(1)
    has_nan = (
        per_group(inverse[nan_rows], torch.ones(len(nan_rows), dtype=torch.float64, device=device))
        > 0
    )
    # NaN scores sort last and break no tie: their group's value would be arbitrary, so NaN.
    value = torch.where(
        counts & ~has_nan, dcg / ideal.clamp_min(torch.finfo(torch.float64).tiny), math.nan
    )
    return value, counts


def grouped_ndcg(
    preds: Tensor, gains: Tensor, groups: Tensor, k: int = 10
) -> tuple[Tensor, Tensor]:
    """NDCG@k of every group (see :func:`ndcg`), in ``torch.unique`` (ascending id) order.

    Returns:
        ``(ndcg_per_group, counts)``: float64 values (NaN for groups without a positive gain or
        with a NaN score) and a bool mask of the groups with a positive gain.
    """
    _check_1d(preds=preds, gains=gains, groups=groups)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    uniq, inverse = torch.unique(groups, return_inverse=True)
    scores = preds.to(torch.float64)
    positions = _tie_positions(scores, inverse, uniq.numel())
    return _ndcg_per_group(positions, scores, gains.to(torch.float64), inverse, uniq.numel(), k)


def ndcg(preds: Tensor, gains: Tensor, groups: Tensor, k: int = 10) -> Tensor:
    """Mean NDCG@k over the groups (users) holding at least one row with ``gain > 0``.

    Within a group, rows are ranked by ``preds`` descending; DCG@k = Σ gain · 1/log2(rank + 1)
    over ranks 1..k, divided by the ideal DCG@k (the gains sorted descending).  Only rows
    with ``gain > 0`` add to either (a negative gain counts as 0; sklearn refuses one).  Tied
    scores get the mean DCG over every order of the tied rows (each tied row takes the block's
    mean gain), which is ``sklearn.metrics.ndcg_score`` with ``ignore_ties=False`` and makes
    the value independent of row order.  Groups without a positive gain have no ideal
    ranking and are left out (not counted as 0 or 1); NaN if no group has one, or if a counted
    group has a NaN score.
    """
    value, counts = grouped_ndcg(preds, gains, groups, k)
    return _mean_ndcg(value, counts)


def _mean_ndcg(value: Tensor, counts: Tensor) -> Tensor:
    n = counts.sum()
    total = torch.where(counts, value, 0.0).sum()
    return torch.where(n > 0, total / n.clamp_min(1), math.nan)


# --------------------------------------------------------------------------------------------
# XAUC, calibration, logloss
# --------------------------------------------------------------------------------------------


def _pair_counts(pi: Tensor, pj: Tensor, vi: Tensor, vj: Tensor) -> tuple[Tensor, Tensor]:
    """(2 × correctly ordered + prediction ties, number of pairs) over pairs of different value."""
    # Comparisons rather than sign(p_i - p_j): differences of infinities would give NaN.
    valid = vi != vj
    correct = ((pi > pj) & (vi > vj)) | ((pi < pj) & (vi < vj))
    tied = (pi == pj) & valid
    return 2 * correct.sum() + tied.sum(), valid.sum()


def xauc(preds: Tensor, values: Tensor, n_pairs: int = 1_000_000, seed: int = 0) -> Tensor:
    """XAUC for a continuous target (e.g. watch time): share of correctly ordered pairs.

    Over pairs ``(i, j)`` with ``values_i != values_j``, the probability that
    ``sign(pred_i - pred_j) == sign(value_i - value_j)``, prediction ties counting 1/2.

    Exact over all pairs when ``n * (n - 1) / 2 <= n_pairs``; otherwise estimated on
    ``n_pairs`` pairs drawn uniformly with replacement by a CPU ``torch.Generator`` seeded with
    ``seed`` (pairs of equal value, including ``i == j``, are discarded), so the estimate is
    reproducible across devices for the same data in the same row order.  Both modes work
    in bounded memory chunks.  NaN if no pair has different values or any input is NaN.
    """
    n = _check_1d(preds=preds, values=values)
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be positive, got {n_pairs}")
    device = preds.device
    p = preds.to(torch.float64)
    v = values.to(device=device, dtype=torch.float64)
    if bool(torch.isnan(p).any() | torch.isnan(v).any()):
        return _nan(device)

    score = torch.zeros((), dtype=torch.long, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    if n * (n - 1) // 2 <= n_pairs:
        # Exact: every ordered pair, blockwise over rows.  Each unordered pair is counted twice
        # in the same way, which leaves the ratio unchanged.
        rows = max(1, _PAIR_CHUNK // max(n, 1))
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            s, c = _pair_counts(p[start:stop, None], p[None, :], v[start:stop, None], v[None, :])
            score += s
            count += c
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for start in range(0, n_pairs, _PAIR_CHUNK):
            k = min(_PAIR_CHUNK, n_pairs - start)
            i = torch.randint(0, n, (k,), generator=gen).to(device)
            j = torch.randint(0, n, (k,), generator=gen).to(device)
            s, c = _pair_counts(p[i], p[j], v[i], v[j])
            score += s
            count += c
    return torch.where(count > 0, score.to(torch.float64) / (2 * count), math.nan)


def calibration(probs: Tensor, target: Tensor) -> Tensor:
    """Mean predicted probability over observed positive rate (``target > 0``); 1 is calibrated.

    NaN if there is no positive.
    """
    _check_1d(probs=probs, target=target)
    rate = (target > 0).to(torch.float64).mean()
    return torch.where(rate > 0, probs.to(torch.float64).mean() / rate, math.nan)


def logloss(probs: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy against ``target > 0``, probs clamped to [1e-7, 1 - 1e-7]."""
    _check_1d(probs=probs, target=target)
    p = probs.to(torch.float64).clamp(_EPS, 1 - _EPS)
    return -torch.where(target > 0, torch.log(p), torch.log1p(-p)).mean()


# --------------------------------------------------------------------------------------------
# Metric classes
# --------------------------------------------------------------------------------------------


class CatMetric(Metric):
    """Metric whose states are "cat" lists of fixed dtype and trailing shape.

    torchmetrics pads a rank that saw no data with ``torch.tensor([], dtype=self.dtype)``: 1-D
    and of the metric's float dtype (which every ``.to(device)`` resets to float32).  That
    mismatches float64 / int64 / 2-D states on the other ranks and breaks all_gather, so empty
    states are replaced here by correctly typed empty tensors before syncing.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def _add_cat_state(self, name: str, dtype: torch.dtype, tail: tuple[int, ...] = ()) -> None:
        if not hasattr(self, "_cat_specs"):
            self._cat_specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._cat_specs[name] = (dtype, tail)
        self.add_state(name, default=[], dist_reduce_fx="cat")

    def _cat(self, name: str) -> Tensor:
        dtype, tail = self._cat_specs[name]
        state = getattr(self, name)
        if isinstance(state, Tensor):  # already concatenated by a sync
            return state
        if not state:
            return torch.empty((0, *tail), dtype=dtype, device=self.device)
        return torch.cat(state)

    def _sync_dist(self, *args: Any, **kwargs: Any) -> None:
        for name, (dtype, tail) in self._cat_specs.items():
            if not getattr(self, name):
                empty = torch.empty((0, *tail), dtype=dtype, device=self.device)
                setattr(self, name, [empty])
        super()._sync_dist(*args, **kwargs)


class GroupAUC(CatMetric):
    """Accumulating, DDP-synced :func:`gauc`; keeps every prediction in memory (exact AUC)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_cat_state("preds", torch.float64)
        self._add_cat_state("target", torch.float64)
        self._add_cat_state("groups", torch.long)

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        _check_1d(preds=preds, target=target, groups=groups)
        self.preds.append(preds.detach().to(torch.float64))
        self.target.append(target.detach().to(torch.float64))
        self.groups.append(groups.detach().to(torch.long))

    def compute(self) -> Tensor:
        return gauc(self._cat("preds"), self._cat("target"), self._cat("groups"))


class XAUC(CatMetric):
    """Accumulating, DDP-synced :func:`xauc` (exact or ``n_pairs`` seeded sampled pairs)."""

    def __init__(self, n_pairs: int = 1_000_000, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_pairs = n_pairs
        self.seed = seed
        self._add_cat_state("preds", torch.float64)
        self._add_cat_state("values", torch.float64)

    def update(self, preds: Tensor, values: Tensor) -> None:
        _check_1d(preds=preds, values=values)
        self.preds.append(preds.detach().to(torch.float64))
        self.values.append(values.detach().to(torch.float64))

    def compute(self) -> Tensor:
        return xauc(self._cat("preds"), self._cat("values"), self.n_pairs, self.seed)


class BehaviourMetrics(CatMetric):
    """All per-behaviour metrics of one validation / test split from one stored copy of the data.

    The model emits one score per row (``probs``, the probability of ``label``); every behaviour
    is evaluated against that score:

    * binary behaviour ``b``: ``b/auc`` and ``b/gauc`` (AUC within ``groups``, weighted by group
      size over groups holding both classes);
    * continuous behaviour ``c``: ``c/xauc`` against its values and ``c/auc`` against
      ``value > 0``;
    * the label additionally ``label/logloss`` and ``label/calibration`` (target ``value > 0``)
      of its probability (``label_probs``; the score itself when not given), the label's odds
      correction fitted on the split (``label/odds_factor``, see `train.calibration`) and
      ``label/calibration_corrected``: the calibration after ``correction`` (the one fitted on
      validation, set before a test split's compute), or after the split's own fit without one;
    * ``<label>/ndcg@<k>`` (:func:`ndcg` within ``groups``, ``ndcg_k``; None: not computed) with
      gain ``label > 0``; with a scheme as ``ndcg_gain``, ``<its label>/ndcg_<its name>@<k>``
      with the scheme's weight as the gain of its positives and 0 for every other row (see
      :func:`scheme_gains`);
    * for every behaviour named in ``oracle``, the same metrics computed from the oracle score
      as ``b/oracle_<metric>``: ``oracle_auc`` of a continuous behaviour ranks by
      ``oracle_positive`` where given, else by the oracle expectation; ``oracle_xauc`` by the
      oracle expectation; the label's ``oracle_logloss`` / ``oracle_calibration`` use the
      oracle probability (for a continuous label that is ``oracle_positive``; NaN without it);
      ``oracle_ndcg...`` ranks by the oracle column of the gain's label.

    AUC and GAUC are exact, so every row of the split is kept in memory (one float64 row of
    score, behaviours and oracle columns plus the int64 group id) until :meth:`reset`; that is
    fine for validation sets, not for unbounded streams.  XAUC is exact while
    ``n * (n - 1) / 2 <= xauc_pairs`` and otherwise samples ``xauc_pairs`` pairs with a generator
    seeded with ``seed`` (see :func:`xauc`); the sample depends on the row order of the gathered
    data, hence on how a sampler shards rows over ranks.

    :meth:`compute` is a collective under DDP (states are all-gathered, uneven or empty shards
    allowed): call it on every rank; every rank gets the same dict of Python floats.
    """

    def __init__(
        self,
        behaviours: Sequence[str],
        continuous: Sequence[str],
        label: str,
        oracle: Sequence[str] = (),
        xauc_pairs: int = 1_000_000,
        seed: int = 0,
        ndcg_k: int | None = 10,
        ndcg_gain: WeightScheme | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.behaviours = tuple(behaviours)
        self.continuous = tuple(continuous)
        self.label = label
        self.oracle = tuple(oracle)
        self.xauc_pairs = xauc_pairs
        self.seed = seed
        self.correction: OddsCorrection | None = None
        """Applied to the label's probability for `calibration_corrected` (None: the split's own
        fit, as on validation)."""
        self.fitted: OddsCorrection | None = None
        """The correction the last `compute` fitted on its split."""
        known = set(self.behaviours)
        for what, names in (
            ("behaviours", self.behaviours),
            ("continuous", self.continuous),
            ("oracle", self.oracle),
        ):
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate names in {what}: {list(names)}")
            if not set(names) <= known:
                raise ValueError(f"{what} not among behaviours: {sorted(set(names) - known)}")
        if label not in known:
            raise ValueError(f"label {label!r} not among behaviours {list(self.behaviours)}")
        if xauc_pairs < 1:
            raise ValueError(f"xauc_pairs must be positive, got {xauc_pairs}")
        if ndcg_k is not None and (
            isinstance(ndcg_k, bool) or not isinstance(ndcg_k, int) or ndcg_k < 1
        ):
            raise ValueError(f"ndcg_k must be an integer >= 1 or None, got {ndcg_k!r}")
        if ndcg_gain is not None:
            ndcg_gain.check_behaviours(self.behaviours)
        self.ndcg_k = ndcg_k
        self.ndcg_gain = ndcg_gain

        # Stored row layout: [probs | behaviours (K) | oracle (M) | oracle_positive of the
        # continuous oracle behaviours (NaN where not given) | the label's probability].
        k, m = len(self.behaviours), len(self.oracle)
        self._oracle_continuous = [m_ for m_, b in enumerate(self.oracle) if b in self.continuous]
        self._positive_col = {
            self.oracle[m_]: 1 + k + m + i for i, m_ in enumerate(self._oracle_continuous)
        }
        self._label_col = 1 + k + m + len(self._oracle_continuous)
        self._n_cols = self._label_col + 1
        self._add_cat_state("rows", torch.float64, (self._n_cols,))
        self._add_cat_state("groups", torch.long)

    def update(
        self,
        probs: Tensor,
        behaviours: Tensor,
        groups: Tensor,
        oracle: Tensor | None = None,
        oracle_positive: Tensor | None = None,
        label_probs: Tensor | None = None,
    ) -> None:
        """Add a batch: ``probs [B]``, ``behaviours [B, K]``, ``groups [B]`` (int64),
        ``oracle [B, M]`` and optional ``oracle_positive [B, M]`` in ``self.oracle`` order, and
        the label's probability ``label_probs [B]`` where the score is not it (multi-head)."""
        b = _check_1d(probs=probs, groups=groups)
        k, m = len(self.behaviours), len(self.oracle)
        if behaviours.shape != (b, k):
            raise ValueError(f"behaviours must have shape {(b, k)}, got {tuple(behaviours.shape)}")
        if m and oracle is None:
            raise ValueError(f"oracle columns {list(self.oracle)} declared but oracle is None")
        if not m and (oracle is not None or oracle_positive is not None):
            raise ValueError("oracle given but no oracle behaviours were declared")
        cols = [probs.detach().to(torch.float64)[:, None], behaviours.detach().to(torch.float64)]
        if m:
            assert oracle is not None
            if oracle.shape != (b, m):
                raise ValueError(f"oracle must have shape {(b, m)}, got {tuple(oracle.shape)}")
            cols.append(oracle.detach().to(torch.float64))
            idx = self._oracle_continuous
            if oracle_positive is None:
                cols.append(
                    torch.full((b, len(idx)), math.nan, dtype=torch.float64, device=probs.device)
                )
            else:
                if oracle_positive.shape != (b, m):
                    raise ValueError(
                        f"oracle_positive must have shape {(b, m)}, "
                        f"got {tuple(oracle_positive.shape)}"
                    )
                cols.append(oracle_positive.detach().to(torch.float64)[:, idx])
        if label_probs is None:
            cols.append(cols[0])
        else:
            _check_1d(probs=probs, label_probs=label_probs)
            cols.append(label_probs.detach().to(torch.float64)[:, None])
        self.rows.append(torch.cat([c.to(probs.device) for c in cols], dim=1))
        self.groups.append(groups.detach().to(torch.long))

    def compute(self) -> dict[str, float]:
        rows = self._cat("rows")
        groups = self._cat("groups")
        k = len(self.behaviours)
        uniq, inverse = torch.unique(groups, return_inverse=True)
        n_groups = uniq.numel()
        single = torch.zeros_like(inverse)

        # Ranks depend only on the score, so they are computed once per score column and
        # reused for every behaviour evaluated against it (and, within groups, by NDCG).
        position_cache: dict[tuple[int, bool], Tensor] = {}
        rank_cache: dict[tuple[int, bool], Tensor] = {}

        def positions(col: int, grouped: bool) -> Tensor:
            if (col, grouped) not in position_cache:
                by = (inverse, n_groups) if grouped else (single, 1)
                position_cache[col, grouped] = _tie_positions(rows[:, col], *by)
            return position_cache[col, grouped]

        def ranks(col: int, grouped: bool) -> Tensor:
            if (col, grouped) not in rank_cache:
                rank_cache[col, grouped] = _ranks_from_positions(
                    positions(col, grouped), rows[:, col]
                )
            return rank_cache[col, grouped]

        def auc_of(col: int, positive: Tensor) -> Tensor:
            return _auc_from_ranks(ranks(col, False), positive, single, 1)[0][0]

        def gauc_of(col: int, positive: Tensor) -> Tensor:
            return _weighted_gauc(*_auc_from_ranks(ranks(col, True), positive, inverse, n_groups))

        out: dict[str, Tensor] = {}
        for j, name in enumerate(self.behaviours):
            values = rows[:, 1 + j]
            positive = values > 0
            # (prefix, rank score column, AUC score column or tensor, probability for the label)
            label_prob = rows[:, self._label_col]
            scorers: list[tuple[str, int, Tensor | int, Tensor]] = [("", 0, 0, label_prob)]
            if name in self.oracle:
                col = 1 + k + self.oracle.index(name)
                if name in self.continuous:
                    pos_col = rows[:, self._positive_col[name]]
                    auc_score = torch.where(torch.isnan(pos_col), rows[:, col], pos_col)
                    scorers.append(("oracle_", col, auc_score, pos_col))
                else:
                    scorers.append(("oracle_", col, col, rows[:, col]))
            for prefix, col, auc_score, prob in scorers:
                key = f"{name}/{prefix}"
                if name in self.continuous:
                    out[key + "xauc"] = xauc(rows[:, col], values, self.xauc_pairs, self.seed)
                    if isinstance(auc_score, Tensor):
                        out[key + "auc"] = auc(auc_score, values)
                    else:
                        out[key + "auc"] = auc_of(auc_score, positive)
                else:
                    out[key + "auc"] = auc_of(col, positive)
                    out[key + "gauc"] = gauc_of(col, positive)
                if name == self.label:
                    out[key + "logloss"] = logloss(prob, values)
                    out[key + "calibration"] = calibration(prob, values)
            if name == self.label:
                out |= self._corrected(label_prob, values)
        if self.ndcg_k is not None:
            out |= self._ndcg(rows, inverse, n_groups, lambda col: positions(col, True))
        # One device-to-host transfer instead of one sync per metric.
        return dict(zip(out, torch.stack(list(out.values())).cpu().tolist(), strict=True))

    def _corrected(self, probs: Tensor, values: Tensor) -> dict[str, Tensor]:
        self.fitted = OddsCorrection.fit(probs, values, self.label)
        correction = self.correction or self.fitted
        nan = _nan(probs.device)
        return {
            f"{self.label}/odds_factor": (
                torch.tensor(self.fitted.odds_factor, dtype=torch.float64, device=probs.device)
                if self.fitted
                else nan
            ),
            f"{self.label}/calibration_corrected": (
                calibration(correction.apply(probs), values) if correction else nan
            ),
        }

    def _ndcg(
        self, rows: Tensor, inverse: Tensor, n_groups: int, positions: Callable[[int], Tensor]
    ) -> dict[str, Tensor]:
        assert self.ndcg_k is not None
        k, behaviours = len(self.behaviours), rows[:, 1 : 1 + len(self.behaviours)]
        label, name = ndcg_key(self.label, self.ndcg_k, self.ndcg_gain).split("/")
        if self.ndcg_gain is None:
            gains = (behaviours[:, self.behaviours.index(label)] > 0).to(torch.float64)
        else:
            gains = scheme_gains(self.ndcg_gain, behaviours, self.behaviours)
        columns = {"": 0}
        if label in self.oracle:
            columns["oracle_"] = 1 + k + self.oracle.index(label)
        return {
            f"{label}/{prefix}{name}": _mean_ndcg(
                *_ndcg_per_group(
                    positions(col), rows[:, col], gains, inverse, n_groups, self.ndcg_k
                )
            )
            for prefix, col in columns.items()
        }


def ndcg_key(label: str, k: int, gain: WeightScheme | None = None) -> str:
    """`<label>/ndcg@<k>`, or with a gain scheme `<its label>/ndcg_<its name>@<k>`: the name
    under which `BehaviourMetrics` logs NDCG (runs with other gains never share a column)."""
    if gain is None:
        return f"{label}/ndcg@{k}"
    return f"{gain.label}/ndcg_{gain.name}@{k}"


def scheme_gains(scheme: WeightScheme, behaviours: Tensor, names: Sequence[str]) -> Tensor:
    """NDCG gains from a weight scheme: a positive's weight (``scheme.label > 0``: click 1,
    finish 3 more, long watch 5 more under ``seed``), 0 for every other row.

    "Positive" is the scheme's own: its label > 0, the rows its terms weigh in training. A row
    whose label is 0 gains nothing even if a term would read a value there (a finish without a
    click): the scheme gives such a row its negative weight, not a graded one, so counting it
    here would grade rows the training never grades.  Unnormalised (``normalize: mean`` only
    scales every gain, which NDCG does not see)."""
    positive = behaviours[:, list(names).index(scheme.label)] > 0
    weights = scheme.weights(behaviours, names).to(torch.float64)
    return torch.where(positive, weights, 0.0)
