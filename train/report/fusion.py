"""The no-retrain fusion baseline in the report: the α sweep over the test predictions a
multi-task run (`model=multihead`, or any model whose heads write the same file) saves, and the
report rows it gives (kind `fusion`, one series per run).

A multi-head model scores every behaviour on its own (p_b); the ranking score fuses the heads,

    score = Σ_b α_b · log p_b        (= log Π_b p_b^α_b, ranked identically)

Since α only enters after training, one run's saved test predictions (`predictions.parquet`,
written by `train.heads.HeadOutputs.table`: every head's probability, the behaviours, the group
key and the oracle columns) give the metrics of any α without retraining. The sweep computes
them exactly as the job does: the same `BehaviourMetrics` on the same rows in the same order,
the score (`train.heads.fused_score`) in float64 from the saved float32 probabilities; so α
selecting one head (α_h = 1, the others 0) reproduces that head's own metrics to the last bit
(log is strictly increasing, and AUC, GAUC and XAUC depend on the order of the scores only).

The fused score is a ranking score, not a probability: fusion rows carry the ranking metrics
(AUC, GAUC, XAUC) of every behaviour only.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.core import url_to_fs
from torch import Tensor

from train.heads import fused_score
from train.layout import ARTIFACT_KEY, PREDICTIONS_FILE, PREDICTIONS_FORMAT, Row, Run, join
from train.metrics import BehaviourMetrics
from train.report.runs import split_values

GRID: tuple[float, ...] = (0.0, 0.5, 1.0)
"""Default α values of each non-label head in the report's sweep (the label head keeps α = 1)."""
RANKING_METRICS = ("auc", "gauc", "xauc")


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
    raw = (table.schema.metadata or {}).get(ARTIFACT_KEY.encode())
    if raw is None:
        raise FusionError(
            f"{url}: no {ARTIFACT_KEY} metadata; expected a file a multi-task run wrote"
        )
    meta = json.loads(raw)
    if meta.get("format") != PREDICTIONS_FORMAT:
        raise FusionError(
            f"{url}: predictions format {meta.get('format')!r}; this reads {PREDICTIONS_FORMAT}"
        )
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
    by the job's own `BehaviourMetrics` with the run's XAUC pairs and seed (no ndcg@k:
    predictions.parquet does not record the run's k and gain)."""
    metrics = BehaviourMetrics(
        pred.behaviours, pred.continuous, pred.label, (), pred.xauc_pairs, pred.seed, ndcg_k=None
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


def run_names(runs: Sequence[Run]) -> dict[str, str]:
    """A short name per run (by folder URL) that tells multi-task runs apart in labels and in the
    plot's legend: the model class (`train.model.MMoE` -> `mmoe`) where no other run shares it,
    else the run folder's name, numbered if even that repeats."""

    def model_class(run: Run) -> str:
        model = run.config.get("model") or {}
        target = model.get("_target_") if isinstance(model, Mapping) else None
        return str(target).rsplit(".", 1)[-1].lower() if target else ""

    def folder(run: Run) -> str:
        return run.url.rstrip("/").rsplit("/", 1)[-1]

    classes = [model_class(r) for r in runs]
    names = [
        c if c and classes.count(c) == 1 else folder(r) for r, c in zip(runs, classes, strict=True)
    ]
    seen: dict[str, int] = {}
    out = {}
    for run, name in zip(runs, names, strict=True):
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            name = f"{name} #{seen[name]}"
        out[run.url] = name
    return out


def fusion_rows(runs: Sequence[Run], split: str, grid: Sequence[float] = GRID) -> list[Row]:
    """Rows of kind `fusion`: for every multi-task run (any model that saved predictions.parquet,
    or one whose config names heads), one row per α of `alpha_grid` (split `test` only:
    predictions are of the test split); a run without them (or another split) gives one row, its
    configured fusion, from metrics.json. With several such runs each row's label and series
    start with the run's name (`mmoe fusion click=1`), so their fronts stay apart."""
    mine = [r for r in runs if r.is_multitask]
    names = run_names(mine)
    rows: list[Row] = []
    for run in mine:
        series = "fusion" if len(mine) == 1 else f"{names[run.url]} fusion"
        url = join(run.url, PREDICTIONS_FILE)
        fs, path = url_to_fs(url)
        if split == "test" and (run.has_predictions or fs.exists(path)):
            pred = read_predictions(url)
            for alpha in alpha_grid(pred.heads, pred.label, grid, [pred.fusion]):
                label = f"{series} {describe(alpha, pred.heads)}"
                rows.append(Row(label, "fusion", fusion_metrics(pred, alpha), run.url, series))
            continue
        model = run.config.get("model") or {}
        heads = [str(h) for h in model.get("heads") or []]
        configured = model.get("fusion") or ({heads[0]: 1.0} if heads else {})
        values = {
            k: v
            for k, v in split_values(run.metrics, split, False).items()
            if not k.rsplit("/", 1)[1].startswith("head_")
        }
        label = f"{series} {describe(configured, heads or list(configured)) or 'as trained'}"
        rows.append(Row(label, "fusion", values, run.url, series))
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
