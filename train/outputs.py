"""What a run leaves in its folder: the resolved config, training statistics, metrics.json and
the closing table. Every writer here is called on rank 0 only."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
from fsspec.core import url_to_fs

SECRET_KEY = re.compile(r"secret|password|passwd|token|credential", re.IGNORECASE)
SAFE_OPTIONS = {"endpoint_url", "region_name", "anon", "use_ssl", "client_kwargs", "project"}
REDACTED = "***"


def redact(value: Any, storage_options: bool = False) -> Any:
    """Replace credentials before anything is saved: every value under a `storage_options` key
    except plainly public settings (endpoint, region), and any secret-looking key elsewhere."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            name = str(key)
            hidden = SECRET_KEY.search(name) or (storage_options and name not in SAFE_OPTIONS)
            if hidden and item not in (None, "", {}):
                out[key] = REDACTED
            else:
                out[key] = redact(item, storage_options or name == "storage_options")
        return out
    if isinstance(value, list | tuple):
        return [redact(v, storage_options) for v in value]
    return value


class OutputError(SystemExit):
    """The output folder cannot be written (a file where a folder should be, no permission):
    ends the job like `sys.exit` with the path and the reason, not a traceback."""


def write_text(url: str, text: str) -> None:
    """Write to `url` (any fsspec URL) via a temporary name and a rename where the filesystem
    has one, so a reader never sees a half-written file."""
    try:
        _write_text(url, text)
    except (NotADirectoryError, FileExistsError, PermissionError, IsADirectoryError) as err:
        raise OutputError(
            f"error: cannot write {url}: {err.strerror or err} ({type(err).__name__}); the output "
            "folder (paths.output_dir, out) must be a writable folder or URL"
        ) from err


def _write_text(url: str, text: str) -> None:
    fs, path = url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if fs.protocol in ("file", "local") or "file" in fs.protocol:
        tmp = f"{path}.tmp"
        with fs.open(tmp, "w") as handle:
            handle.write(text)
        fs.mv(tmp, path)
    else:
        # Object stores publish an object only once its upload completes.
        with fsspec.open(url, "w") as handle:
            handle.write(text)


def write_json(url: str, payload: Mapping[str, Any]) -> None:
    write_text(url, json.dumps(_jsonable(payload), indent=2, sort_keys=True) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN; null reads as "undefined" (e.g. one class only)
    return value


def remove_if_empty(url: str) -> None:
    """Undo the run folder Hydra made when the job fails before writing anything."""
    fs, path = url_to_fs(url)
    try:
        if fs.isdir(path) and not fs.ls(path):
            fs.rmdir(path)
    except OSError:
        pass


METRIC_ORDER = ("auc", "gauc", "xauc", "logloss", "calibration")


def format_table(
    metrics: Mapping[str, float], behaviours: Sequence[str], split: str = "test"
) -> str:
    """Behaviours x metrics of one split, the oracle beside the model where there is one."""
    columns: list[str] = []
    for metric in METRIC_ORDER:
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
    from dataclasses import asdict

    return {
        "format": 1,
        "model": dict(model_config),
        "spec": _plain(asdict(spec)),
        "stats": asdict(stats),
        "scheme": {"describe": scheme.describe(), **_plain(asdict(scheme))},
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
