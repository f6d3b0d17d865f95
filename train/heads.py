"""Multi-head training (`model=multihead`, `mmoe`, `ple`), the no-retrain fusion baselines: every behaviour's
head on its own loss, evaluation of every head, and the test predictions the report's α sweep
(`train.report.fusion`) reads.

A multi-head model scores every behaviour on its own (p_b); the ranking score fuses the heads,

    score = Σ_b α_b · log p_b        (= log Π_b p_b^α_b, ranked identically)

Since α only enters after training, one run's saved test predictions (`predictions.parquet`:
every head's probability, the behaviours, the group key and the oracle columns) give the
metrics of any α without retraining.

Heads (see `head_weights`): a binary behaviour's head is plain BCE on `behaviour > 0`; a
continuous one (watch time) is YouTube's weighted logistic head (Covington et al. 2016):
label `value > 0`, positives weighted by their value over the mean value of the training
positives, negatives 1, so its odds estimate E[value] / (mean positive value) and its
probability ranks by expected watch time on a scale comparable with the binary heads' (which
makes log p of every head a sensible term of the fusion). A head may instead take its own
weight scheme (`model.head_weights={click: seed}`, the grammar of `conf/weights/`): its loss is
then that scheme's weighted BCE, as if its rows were repeated by their weights.

The fused score is a ranking score, not a probability: a multi-head run's `<label>/logloss` and
`<label>/calibration` measure its label head's probability instead.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from train.data.batch import Batch
from train.data.features import FeatureSpec
from train.data.stats import TrainStats
from train.host import take_columns
from train.layout import ARTIFACT_KEY, PREDICTIONS_FORMAT
from train.metrics import CatMetric, auc, calibration, logloss, xauc
from train.objective import Evaluation, Objective
from train.storage import write_parquet
from train.weights import SchemeError, WeightScheme


def positive_means(stats: TrainStats) -> dict[str, float]:
    """Mean value of the positive training rows of every continuous behaviour (the scale of
    its weighted head)."""
    return {
        b: stats.behaviour_mean[b] / stats.positive_rate[b]
        for b in stats.continuous
        if stats.positive_rate.get(b, 0) > 0
    }


def head_scales(
    heads: Sequence[str], continuous: Iterable[str], positive_mean: Mapping[str, float]
) -> Tensor:
    """Per head: 1 / mean positive value for a continuous head (weighted), 0 for a binary one."""
    continuous = set(continuous)
    scales = []
    for h in heads:
        if h in continuous:
            mean = positive_mean.get(h, 0.0)
            if not mean > 0:
                raise ValueError(
                    f"head {h!r} is continuous but its training rows have no positive value "
                    "(its weighted head would have nothing to learn)"
                )
            scales.append(1.0 / mean)
        else:
            scales.append(0.0)
    return torch.tensor(scales, dtype=torch.float32)


def head_weights(values: Tensor, scales: Tensor) -> Tensor:
    """Loss weights [rows, heads]: 1 for binary heads (scale 0) and for negatives; a positive
    of a continuous head weighs value × scale (value / mean positive value)."""
    weighted = (scales > 0) & (values > 0)
    return torch.where(weighted, values * scales, torch.ones_like(values))


def fused_score(probs: Tensor, alpha: Sequence[float] | Tensor) -> Tensor:
    """Σ_b α_b · log p_b in float64 from probabilities [rows, heads] (heads with α = 0 are
    skipped, so a probability that rounded to 0 there cannot turn the sum into NaN)."""
    logs = torch.log(probs.to(torch.float64))
    score = torch.zeros(probs.shape[0], dtype=torch.float64, device=probs.device)
    for j, a in enumerate(torch.as_tensor(alpha, dtype=torch.float64).tolist()):
        if a != 0:
            score = score + a * logs[:, j]
    return score


class HeadOutputs(CatMetric):
    """Every head's probability with the behaviours, group and oracle values of each row of a
    split, kept (and gathered over ranks) in the row order `BehaviourMetrics` sees: for the
    per-head metrics and for `predictions.parquet`. `compute` is a collective under DDP."""

    def __init__(
        self,
        heads: Sequence[str],
        behaviours: Sequence[str],
        continuous: Sequence[str],
        label: str,
        oracle: Sequence[str] = (),
        xauc_pairs: int = 1_000_000,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.heads = list(heads)
        self.behaviours = list(behaviours)
        self.continuous = [b for b in behaviours if b in set(continuous)]
        self.label = label
        self.oracle = list(oracle)
        self.xauc_pairs = xauc_pairs
        self.seed = seed
        h, k, m = len(self.heads), len(self.behaviours), len(self.oracle)
        self._add_cat_state("rows", torch.float64, (h + k + 2 * m,))
        self._add_cat_state("groups", torch.long)

    def update(
        self,
        probs: Tensor,
        behaviours: Tensor,
        groups: Tensor,
        oracle: Tensor | None = None,
        oracle_positive: Tensor | None = None,
    ) -> None:
        cols = [probs, behaviours]
        if self.oracle:
            assert oracle is not None and oracle_positive is not None
            cols += [oracle, oracle_positive]
        self.rows.append(torch.cat([c.detach().to(torch.float64) for c in cols], dim=1))
        self.groups.append(groups.detach().to(torch.long))

    def compute(self) -> dict[str, Tensor]:
        rows = self._cat("rows")
        h, k, m = len(self.heads), len(self.behaviours), len(self.oracle)
        return {
            "probs": rows[:, :h],
            "behaviours": rows[:, h : h + k],
            "oracle": rows[:, h + k : h + k + m],
            "oracle_positive": rows[:, h + k + m :],
            "groups": self._cat("groups"),
        }

    def metrics(self, gathered: Mapping[str, Tensor]) -> dict[str, float]:
        """`<head>/head_auc` (its own behaviour > 0), `head_xauc` for a continuous head,
        `head_logloss` and `head_calibration` for a binary one (the label's `logloss` and
        `calibration` come from `BehaviourMetrics`, given the label head's probability)."""
        out: dict[str, Tensor] = {}
        for j, head in enumerate(self.heads):
            p = gathered["probs"][:, j]
            values = gathered["behaviours"][:, self.behaviours.index(head)]
            out[f"{head}/head_auc"] = auc(p, values)
            if head in self.continuous:
                out[f"{head}/head_xauc"] = xauc(p, values, self.xauc_pairs, self.seed)
            else:
                out[f"{head}/head_logloss"] = logloss(p, values)
                out[f"{head}/head_calibration"] = calibration(p, values)
        return {k: float(v) for k, v in out.items()}

    def table(self, gathered: Mapping[str, Tensor], fusion: Mapping[str, float]) -> pa.Table:
        """`predictions.parquet`: group, y_<behaviour>, p_<head>, oracle_<behaviour> (and
        oracle_positive_<b> for continuous ones), described in the schema metadata."""

        def f32(t: Tensor) -> np.ndarray:
            # Every value was float32 before it was stored as float64: the round trip is exact.
            return t.cpu().numpy().astype(np.float32)

        columns: dict[str, np.ndarray] = {"group": gathered["groups"].cpu().numpy()}
        for j, b in enumerate(self.behaviours):
            columns[f"y_{b}"] = f32(gathered["behaviours"][:, j])
        for j, h in enumerate(self.heads):
            columns[f"p_{h}"] = f32(gathered["probs"][:, j])
        for j, b in enumerate(self.oracle):
            columns[f"oracle_{b}"] = f32(gathered["oracle"][:, j])
            if b in self.continuous:
                columns[f"oracle_positive_{b}"] = f32(gathered["oracle_positive"][:, j])
        meta = {
            "format": PREDICTIONS_FORMAT,
            "heads": self.heads,
            "behaviours": self.behaviours,
            "continuous": self.continuous,
            "label": self.label,
            "oracle": self.oracle,
            "fusion": dict(fusion),
            "xauc_pairs": self.xauc_pairs,
            "seed": self.seed,
        }
        table = pa.table(columns)
        return table.replace_schema_metadata({ARTIFACT_KEY: json.dumps(meta)})


def with_conditionals(
    label: Tensor, weight: Tensor, chain: Sequence[tuple[int, int]]
) -> tuple[Tensor, Tensor]:
    """The targets of `MultiTaskNetwork.training_logits`: every head's [rows, heads], then,
    per conditional head (child, parent) of `chain`, the child's label weighted by its own
    weight on the rows where the parent happened and 0 elsewhere: p(child | parent) fitted
    where it is observed (divided as `loss_denominators` says). The product keeps the child's
    loss on the whole impression space."""
    if not chain:
        return label, weight
    children = [child for child, _ in chain]
    observed = take_columns(label, [parent for _, parent in chain])
    return (
        torch.cat([label, take_columns(label, children)], dim=1),
        torch.cat([weight, take_columns(weight, children) * observed], dim=1),
    )


def loss_denominators(weight_totals: Tensor, chain: Sequence[tuple[int, int]]) -> Tensor:
    """What each output of `with_conditionals` divides its Σwℓ by: its own global Σw, but the
    child's Σw over every impression for a conditional head's own logit. That loss is then
    Σ over the parent's positives of wℓ / Σ over all rows of w: a clicked row weighs as much in
    the own fit as in the product's loss. Divided by the positives' own Σw instead (a mean over
    them), the fit outpaced the heads trained on every row by about the inverse click rate and
    peaked epochs before them, so the click-monitored checkpoint caught it overfitted (README,
    "Multi-task rivals")."""
    if not chain:
        return weight_totals
    heads = len(weight_totals) - len(chain)
    return torch.cat([weight_totals[:heads], take_columns(weight_totals, [c for c, _ in chain])])


class PerHeadBCE(Objective):
    """`model=multihead`: one output per head, each on its own unweighted loss (a continuous
    behaviour's head weighted as in `head_weights`); the metrics rank by the fused score, and
    every head's probability is kept per split for its own metrics and `predictions.parquet`."""

    def __init__(
        self,
        heads: Sequence[str],
        fusion: Mapping[str, float],
        scheme: WeightScheme,
        spec: FeatureSpec,
        stats: TrainStats,
        evaluation: Evaluation,
        head_schemes: Mapping[str, WeightScheme] | None = None,
    ) -> None:
        super().__init__()
        self.heads = list(heads)
        behaviours = spec.behaviour_names
        unknown = [h for h in self.heads if h not in behaviours]
        if unknown or scheme.label not in self.heads:
            raise ValueError(
                f"model.heads {self.heads}: every head must be a behaviour of the data "
                f"{behaviours} and the label {scheme.label!r} must have one"
            )
        if scheme.terms or scheme.negative_weight != 1:
            warnings.warn(
                f"model=multihead trains every head unweighted; weights={scheme.name} only "
                f"picks the label ({scheme.label}), its weights are not used",
                stacklevel=2,
            )
        self.columns = [behaviours.index(h) for h in self.heads]
        self.label_head = self.heads.index(scheme.label)
        self.behaviours = behaviours
        head_schemes = dict(head_schemes or {})
        for head, own in head_schemes.items():
            if head not in self.heads:
                raise SchemeError(
                    f"model.head_weights.{head}: not a head of this model {self.heads}"
                )
            try:
                own.check_behaviours(behaviours)
            except SchemeError as err:
                raise SchemeError(f"model.head_weights.{head} ({own.name}): {err}") from err
        # Columns of the heads a scheme weighs, in head order.
        self.schemed = [(self.heads.index(h), s) for h, s in head_schemes.items()]
        self.fusion = dict(fusion)
        alpha = torch.tensor([self.fusion.get(h, 0.0) for h in self.heads], dtype=torch.float32)
        self.register_buffer("alpha", alpha, persistent=False)
        scales = head_scales(self.heads, stats.continuous, positive_means(stats))
        self.register_buffer("head_scale", scales, persistent=False)

        def outputs() -> HeadOutputs:
            return HeadOutputs(
                self.heads,
                behaviours,
                stats.continuous,
                scheme.label,
                spec.oracle_names,
                evaluation.xauc_pairs,
                evaluation.seed,
            )

        self.outputs = nn.ModuleDict({"val": outputs(), "test": outputs()})

    def targets(self, behaviours: Tensor) -> tuple[Tensor, Tensor]:
        values = take_columns(behaviours, self.columns)
        weights = head_weights(values, self.head_scale)
        if self.schemed:
            # A head with its own scheme takes the scheme's weights (in place of a continuous
            # head's value weighting); normalisation does not matter, Σwℓ / Σw is per head.
            columns = list(weights.unbind(1))
            for j, scheme in self.schemed:
                columns[j] = scheme.weights(behaviours, self.behaviours)
            weights = torch.stack(columns, dim=1)
        return (values > 0).float(), weights

    def score(self, probs: Tensor) -> Tensor:
        # The metrics rank by the fused score, computed as the report's α sweep does.
        return fused_score(probs, self.alpha)

    def label_probs(self, probs: Tensor) -> Tensor:
        return probs[:, self.label_head]

    def update(self, split: str, probs: Tensor, batch: Batch) -> None:
        self.outputs[split].update(
            probs, batch.behaviours, batch.group, batch.oracle, batch.oracle_positive
        )

    def finish(self, split: str, save_to: str | None = None) -> dict[str, float]:
        outputs = self.outputs[split]
        gathered = outputs.compute()
        outputs.reset()
        if save_to:
            write_parquet(save_to, outputs.table(gathered, self.fusion))
        return outputs.metrics(gathered)
