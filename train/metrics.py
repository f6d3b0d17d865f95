"""Exact ranking metrics for per-behaviour evaluation of the ranking model.

Every metric here is exact (rank based, no thresholds or histogram bins), vectorised in torch and
runs on whatever device its inputs live on.  The only approximation is XAUC on large inputs,
where a seeded, stated number of pairs is sampled.

Functional API (1-D inputs of equal length, 0-dim float64 results, NaN when undefined):
:func:`auc`, :func:`grouped_auc`, :func:`gauc`, :func:`xauc`, :func:`calibration`,
:func:`logloss`.  Metric classes for accumulation and DDP sync: :class:`GroupAUC`,
:class:`XAUC`, :class:`BehaviourMetrics`.

Longer than 450 lines because the Metric classes must give exactly the functional results once
gathered over ranks (the report recomputes them from saved predictions and compares): the two
halves are read and changed together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from train.calibration import OddsCorrection

__all__ = [
    "XAUC",
    "BehaviourMetrics",
    "GroupAUC",
    "auc",
    "calibration",
    "gauc",
    "grouped_auc",
    "logloss",
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


def _average_ranks(scores: Tensor, inverse: Tensor, n_groups: int) -> Tensor:
    """1-based rank of every score within its group, ties sharing their average rank.

    Returned in the input row order (float64; half-integers, so sums stay exact), NaN where the
    score is NaN.  ``inverse`` holds dense group indices in ``[0, n_groups)``.
    """
    n = scores.numel()
    device = scores.device
    order = torch.argsort(scores, stable=True)
    if n_groups > 1:
        # A stable sort by group after a sort by score is a lexicographic sort by (group, score).
        order = order[torch.argsort(inverse[order], stable=True)]
    g = inverse[order]
    s = scores[order]

    # Tie blocks are runs of equal (group, score); a group change always opens a new block so
    # that ties are never shared across groups.
    starts = torch.ones(n, dtype=torch.bool, device=device)
    starts[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    ends = torch.ones(n, dtype=torch.bool, device=device)
    ends[:-1] = starts[1:]
    pos = torch.arange(n, device=device)
    first = torch.cummax(torch.where(starts, pos, 0), 0).values
    last = torch.cummin(torch.where(ends, pos, n - 1).flip(0), 0).values.flip(0)

    counts = torch.zeros(n_groups, dtype=torch.long, device=device)
    counts.scatter_add_(0, inverse, torch.ones_like(inverse))
    group_start = torch.cumsum(counts, 0) - counts

    rank_sorted = (first + last).to(torch.float64) / 2 - group_start[g].to(torch.float64) + 1
    ranks = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    # NaN compares unequal to itself, so NaN rows got arbitrary ranks; make that visible instead.
    return torch.where(torch.isnan(scores), math.nan, ranks)


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
    * for every behaviour named in ``oracle``, the same metrics computed from the oracle score
      as ``b/oracle_<metric>``: ``oracle_auc`` of a continuous behaviour ranks by
      ``oracle_positive`` where given, else by the oracle expectation; ``oracle_xauc`` by the
      oracle expectation; the label's ``oracle_logloss`` / ``oracle_calibration`` use the
      oracle probability (for a continuous label that is ``oracle_positive``; NaN without it).

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
        # reused for every behaviour evaluated against it.
        rank_cache: dict[tuple[int, bool], Tensor] = {}

        def ranks(col: int, grouped: bool) -> Tensor:
            if (col, grouped) not in rank_cache:
                score = rows[:, col]
                if grouped:
                    rank_cache[col, grouped] = _average_ranks(score, inverse, n_groups)
                else:
                    rank_cache[col, grouped] = _average_ranks(score, single, 1)
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
