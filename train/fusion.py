"""The no-retrain fusion baseline of `model=multihead`: per-head losses and metrics, the test
predictions a run saves, and the α sweep `python -m train.report` runs on them.

A multi-head model scores every behaviour on its own (p_b); the ranking score fuses the heads,

    score = Σ_b α_b · log p_b        (= log Π_b p_b^α_b, ranked identically)

Since α only enters after training, one run's saved test predictions (`predictions.parquet`:
every head's probability, the behaviours, the group key and the oracle columns) give the
metrics of any α without retraining. The sweep computes them exactly as the job does: the same
`BehaviourMetrics` on the same rows in the same order, the score in float64 from the saved
float32 probabilities; so α selecting one head (α_h = 1, the others 0) reproduces that head's
own metrics to the last bit (log is strictly increasing, and AUC, GAUC and XAUC depend on the
order of the scores only).

The fused score is a ranking score, not a probability: fusion rows carry the ranking metrics
(AUC, GAUC, XAUC) of every behaviour; a multi-head run's `<label>/logloss` and
`<label>/calibration` measure its label head's probability instead.

Heads (see `head_weights`): a binary behaviour's head is plain BCE on `behaviour > 0`; a
continuous one (watch time) is YouTube's weighted logistic head (Covington et al. 2016):
label `value > 0`, positives weighted by their value over the mean value of the training
positives, negatives 1, so its odds estimate E[value] / (mean positive value) and its
probability ranks by expected watch time on a scale comparable with the binary heads' (which
makes log p of every head a sensible term of the fusion).
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.core import url_to_fs
from torch import Tensor

from train.metrics import BehaviourMetrics, _CatMetric, auc, calibration, logloss, xauc

if TYPE_CHECKING:
    from train.data.stats import TrainStats
    from train.report import Row, Run

PREDICTIONS_FILE = "predictions.parquet"
FORMAT = 1
GRID: tuple[float, ...] = (0.0, 0.5, 1.0)
"""Default α values of each non-label head in the report's sweep (the label head keeps α = 1)."""
RANKING_METRICS = ("auc", "gauc", "xauc")


# --------------------------------------------------------------------------------------------
# Training: per-head weights and the fused score
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Evaluation: every head's probability, gathered over ranks
# --------------------------------------------------------------------------------------------


class HeadOutputs(_CatMetric):
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
        `head_logloss` and `head_calibration` for a binary one; and the label's `logloss` and
        `calibration` from the label head (the fused score is not a probability)."""
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
            if head == self.label:
                out[f"{head}/logloss"] = logloss(p, values)
                out[f"{head}/calibration"] = calibration(p, values)
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
            "format": FORMAT,
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
        return table.replace_schema_metadata({"upweight": json.dumps(meta)})


def write_table(url: str, table: pa.Table) -> None:
    """Write Parquet to any fsspec URL; on a local disk via a temporary name and a rename."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    fs, path = url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if "file" in fs.protocol or "local" in fs.protocol:
        with fs.open(f"{path}.tmp", "wb") as handle:
            handle.write(buffer.getvalue())
        fs.mv(f"{path}.tmp", path)
    else:
        with fsspec.open(url, "wb") as handle:
            handle.write(buffer.getvalue())


# --------------------------------------------------------------------------------------------
# The sweep: metrics of any α from saved predictions
# --------------------------------------------------------------------------------------------


class FusionError(ValueError):
    """A predictions file the sweep cannot use; the message names the file."""


@dataclass
class Predictions:
    """One run's saved test predictions (what `HeadOutputs.table` wrote)."""

    url: str
    heads: list[str]
    behaviours: list[str]
    continuous: list[str]
    label: str
    fusion: dict[str, float]
    xauc_pairs: int
    seed: int
    probs: Tensor
    """[rows, heads] float32 probabilities, in the saved row order."""
    values: Tensor
    """[rows, behaviours] float64."""
    groups: Tensor


def read_predictions(url: str) -> Predictions:
    try:
        with fsspec.open(url, "rb") as handle:
            table = pq.read_table(handle)
    except FileNotFoundError as err:
        raise FusionError(f"{url}: no such file") from err
    except pa.ArrowInvalid as err:
        raise FusionError(f"{url}: not a Parquet file ({err})") from err
    raw = (table.schema.metadata or {}).get(b"upweight")
    if raw is None:
        raise FusionError(f"{url}: no upweight metadata; expected a file a multihead run wrote")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise FusionError(f"{url}: predictions format {meta.get('format')!r}; this reads {FORMAT}")
    wanted = ["group"] + [f"y_{b}" for b in meta["behaviours"]] + [f"p_{h}" for h in meta["heads"]]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise FusionError(f"{url}: missing column(s) {missing}")

    def column(name: str, dtype: Any) -> np.ndarray:
        return table.column(name).to_numpy().astype(dtype)

    return Predictions(
        url=url,
        heads=list(meta["heads"]),
        behaviours=list(meta["behaviours"]),
        continuous=list(meta["continuous"]),
        label=str(meta["label"]),
        fusion={str(k): float(v) for k, v in meta["fusion"].items()},
        xauc_pairs=int(meta["xauc_pairs"]),
        seed=int(meta["seed"]),
        probs=torch.from_numpy(np.stack([column(f"p_{h}", np.float32) for h in meta["heads"]], 1)),
        values=torch.from_numpy(
            np.stack([column(f"y_{b}", np.float64) for b in meta["behaviours"]], 1)
        ),
        groups=torch.from_numpy(column("group", np.int64)),
    )


def score_metrics(pred: Predictions, score: Tensor) -> dict[str, float]:
    """The ranking metrics (auc, gauc, xauc) of every behaviour for one score per row, computed
    by the job's own `BehaviourMetrics` with the run's XAUC pairs and seed."""
    metrics = BehaviourMetrics(
        pred.behaviours, pred.continuous, pred.label, (), pred.xauc_pairs, pred.seed
    )
    metrics.update(score, pred.values, pred.groups)
    results = metrics.compute()
    return {k: v for k, v in results.items() if k.rsplit("/", 1)[1] in RANKING_METRICS}


def fusion_metrics(pred: Predictions, alpha: Mapping[str, float]) -> dict[str, float]:
    """The metrics of score = Σ α_b log p_b (heads not named weigh 0)."""
    unknown = sorted(set(alpha) - set(pred.heads))
    if unknown:
        raise FusionError(f"{pred.url}: α names {unknown}, not heads {pred.heads}")
    return score_metrics(pred, fused_score(pred.probs, [alpha.get(h, 0.0) for h in pred.heads]))


def alpha_grid(
    heads: Sequence[str], label: str, grid: Sequence[float] = GRID, extra: Iterable[dict] = ()
) -> list[dict[str, float]]:
    """α settings: the label head at 1 and every other head over `grid` (their product), each
    head alone, and `extra` ones (the run's own fusion). Σ α log p ranks alike under any
    positive scaling of α, so fixing the label's α loses nothing but the rankings that ignore
    the label, of which the single heads are kept."""
    anchor = label if label in heads else heads[0]
    others = [h for h in heads if h != anchor]
    out: list[dict[str, float]] = []
    for combo in itertools.product(sorted(set(grid)), repeat=len(others)):
        out.append({anchor: 1.0, **dict(zip(others, combo, strict=True))})
    out += [{h: 1.0} for h in others]
    out += [dict(e) for e in extra]
    seen, unique = set(), []
    for alpha in out:
        key = tuple(sorted((h, float(a)) for h, a in alpha.items() if a != 0))
        if key and key not in seen:
            seen.add(key)
            unique.append({h: float(a) for h, a in alpha.items() if a != 0})
    return unique


def describe(alpha: Mapping[str, float], heads: Sequence[str]) -> str:
    """`click=1 finish=0.5` in head order (heads at 0 left out)."""
    return " ".join(f"{h}={alpha[h]:g}" for h in heads if alpha.get(h, 0) != 0)


# --------------------------------------------------------------------------------------------
# The report's row source
# --------------------------------------------------------------------------------------------


def is_multihead(config: Mapping[str, Any]) -> bool:
    """A run of a multi-head model (its model config names heads)."""
    model = config.get("model") or {}
    return isinstance(model, Mapping) and bool(model.get("heads"))


def fusion_rows(runs: Sequence[Run], split: str, grid: Sequence[float] = GRID) -> list[Row]:
    """Rows of kind `fusion`: for every multi-head run with saved test predictions, one row per α
    of `alpha_grid` (split `test` only: predictions are of the test split); a multi-head run
    without them (or another split) gives one row, its configured fusion, from metrics.json."""
    from train.report import Row, _split_values

    mine = [r for r in runs if is_multihead(r.config)]
    rows: list[Row] = []
    for run in mine:
        prefix = "fusion" if len(mine) == 1 else f"fusion ({run.url.rstrip('/').rsplit('/')[-1]})"
        url = f"{run.url.rstrip('/')}/{PREDICTIONS_FILE}"
        fs, path = url_to_fs(url)
        if split == "test" and fs.exists(path):
            pred = read_predictions(url)
            for alpha in alpha_grid(pred.heads, pred.label, grid, [pred.fusion]):
                label = f"{prefix} {describe(alpha, pred.heads)}"
                rows.append(Row(label, "fusion", fusion_metrics(pred, alpha), run.url))
            continue
        model = run.config.get("model") or {}
        heads = [str(h) for h in model.get("heads") or []]
        configured = model.get("fusion") or {heads[0]: 1.0}
        values = {
            k: v
            for k, v in _split_values(run.metrics, split, False).items()
            if not k.rsplit("/", 1)[1].startswith("head_")
        }
        rows.append(Row(f"{prefix} {describe(configured, heads)}", "fusion", values, run.url))
    return rows


def parse_grid(text: str) -> tuple[float, ...]:
    """`0,0.5,1` -> (0.0, 0.5, 1.0) for `--fusion-grid`."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise FusionError(f"--fusion-grid {text!r}: expected numbers like 0,0.5,1") from err
    if not values or not all(math.isfinite(v) for v in values):
        raise FusionError(f"--fusion-grid {text!r}: expected finite numbers like 0,0.5,1")
    return values
