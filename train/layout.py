"""The run folder and the formats a run writes: one place for every file name and format number,
shared by the writer (`python -m train`) and the readers (report, predict, export, warm start).

A leaf module: it imports nothing from `train`, so anything may import it.

    <run>/config.yaml            the resolved config, credentials redacted
    <run>/stats.json             training-split statistics
    <run>/metrics.json           "<split>/<behaviour>/<metric>" -> value
    <run>/predictions.parquet    every head's test probabilities (multi-head runs)
    <run>/logs/metrics.csv       CSVLogger          (named in train/conf/logger/csv.yaml)
    <run>/checkpoints/{best,last,first_epoch,hpc_ckpt_N}.ckpt   (train/conf/train.yaml callbacks)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CONFIG_FILE = "config.yaml"
STATS_FILE = "stats.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
CHECKPOINTS_DIR = "checkpoints"
"""`<run>/checkpoints`: every checkpoint callback's `dirpath` (train/conf/train.yaml)."""
BEST_CHECKPOINT = "best.ckpt"
LAST_CHECKPOINT = "last.ckpt"
FIRST_EPOCH_CHECKPOINT = "first_epoch.ckpt"
WARM_START_CANDIDATES = (FIRST_EPOCH_CHECKPOINT, BEST_CHECKPOINT, LAST_CHECKPOINT)
"""The checkpoints of a run folder that `init_from=RUN_FOLDER` probes, in this order."""

METRICS = ("auc", "gauc", "xauc", "logloss", "calibration", "calibration_corrected")
"""The per-behaviour metrics a run reports (`<split>/<behaviour>/<metric>`, and `oracle_<metric>`
on simulated data), in the order tables show them."""
NDCG_METRIC = re.compile(r"ndcg(_[^/@]+)?@\d+")
"""`ndcg@<k>`, or `ndcg_<scheme>@<k>` with graded gains (`metrics.ndcg_k`, `metrics.ndcg_gain`):
per-user NDCG, logged under the label of its gain (train.metrics.BehaviourMetrics)."""

ARTIFACT_FORMAT = 1
"""`checkpoint["upweight"]["format"]`: the layout of what a checkpoint carries besides tensors
(model config, feature spec, statistics, scheme). Readers refuse other numbers by name."""
PREDICTIONS_FORMAT = 1
"""The `upweight` schema metadata of predictions.parquet."""
ARTIFACT_KEY = "upweight"
"""The checkpoint entry (and Parquet metadata key) holding that description."""
CALIBRATION_KEY = "calibration"
"""`checkpoint["upweight"]["calibration"]`: the label's odds correction fitted on validation for
the checkpoint's weights (`train.calibration.OddsCorrection`; absent: no `p_calibrated`)."""
SHARDS_KEY = "shards"
"""`checkpoint["upweight"]["shards"]`: a sharded run's checkpoint keeps its tables in the folder
`<file>.shards/<folder>` (`train.sharding`); absent: the file holds every weight."""
SHARDS_SUFFIX = ".shards"
"""`<checkpoint file>.shards/`: the folder of a sharded checkpoint's shard folders."""
SHARDING_PLAN_FILE = "sharding_plan.json"
"""A sharded run's plan: every rank's shards (table, rows, columns, bytes)."""


def join(folder: str, *names: str) -> str:
    """`folder/name/...` for a local path or an fsspec URL."""
    return "/".join([str(folder).rstrip("/"), *names])


@dataclass(frozen=True)
class Run:
    """One finished training run: its folder and what the job wrote there."""

    url: str
    """The run folder: a local path or an fsspec URL (read other files of the run from it)."""
    metrics: Mapping[str, float]
    """metrics.json: flat `"<split>/<behaviour>/<metric>"` keys; null read as NaN."""
    config: Mapping[str, Any]
    """config.yaml: the resolved (redacted) job config."""
    has_predictions: bool = False
    """The folder holds predictions.parquet (per-head test predictions of a multi-task model)."""

    @property
    def weights(self) -> Mapping[str, Any]:
        return self.config.get("weights") or {}

    @property
    def scheme_name(self) -> str:
        return str(self.weights.get("name", "custom"))

    @property
    def is_multihead(self) -> bool:
        """A run of a multi-head model (its model config names heads)."""
        model = self.config.get("model") or {}
        return isinstance(model, Mapping) and bool(model.get("heads"))

    @property
    def is_multitask(self) -> bool:
        """A run that scores every behaviour with a head of its own, whatever the model class
        (multihead, MMoE, PLE, ...): it saved predictions.parquet, or, when it has none, its
        model config names heads. The report sweeps fusion over such runs."""
        return self.has_predictions or self.is_multihead


@dataclass(frozen=True)
class Row:
    """One point of a comparison: a scheme's run, a fusion setting, or the oracle."""

    label: str
    kind: str
    """`scheme`, `oracle`, `fusion`, or the kind another row source adds."""
    values: Mapping[str, float]
    """`"<behaviour>/<metric>"` -> value on the report's split."""
    source: str = ""
    """The run folder the row comes from (empty for the oracle)."""
    series: str = ""
    """The set of points the plot joins into one front and names in its legend (one per
    multi-task run: `mmoe fusion`); empty: all rows of the kind form one series."""
