"""What a run says about itself: the resolved config (credentials redacted), the closing table,
and the description every checkpoint carries. Written by rank 0 only, with `train.storage`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from train.layout import ARTIFACT_FORMAT, METRICS, NDCG_METRIC
from train.secrets import redact


def format_table(
    metrics: Mapping[str, float], behaviours: Sequence[str], split: str = "test"
) -> str:
    """Behaviours x metrics of one split, the oracle beside the model where there is one."""
    columns: list[str] = []
    ndcg = sorted(
        {
            key.rsplit("/", 1)[1]
            for key in metrics
            if key.startswith(f"{split}/") and NDCG_METRIC.fullmatch(key.rsplit("/", 1)[1])
        }
    )
    for metric in (*METRICS, *ndcg):
        if any(f"{split}/{b}/{metric}" in metrics for b in behaviours):
            columns.append(metric)
            if any(f"{split}/{b}/oracle_{metric}" in metrics for b in behaviours):
                columns.append(f"oracle_{metric}")
    header = ["behaviour", *columns]
    rows = [header]
    for b in behaviours:
        row = [b]
        for column in columns:
            value = metrics.get(f"{split}/{b}/{column}")
            row.append("" if value is None else "nan" if value != value else f"{value:.4f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def config_yaml(config: Mapping[str, Any]) -> str:
    """The resolved run config, credentials redacted: enough to reproduce the run."""
    import yaml

    return yaml.safe_dump(redact(config), sort_keys=False)


def artifact(model_config: Mapping[str, Any], spec: Any, stats: Any, scheme: Any) -> dict[str, Any]:
    """What a checkpoint carries besides tensors, in plain types (loadable with weights_only):
    how to rebuild the network, the data contract, the training statistics and the scheme."""
    return {
        "format": ARTIFACT_FORMAT,
        "model": dict(model_config),
        "spec": spec.state(),
        "stats": asdict(stats),
        "scheme": {"describe": scheme.describe(), **plain(asdict(scheme))},
    }


def plain(value: Any) -> Any:
    """Mappings and sequences as dicts (string keys) and lists, for a checkpoint's description."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
