"""Finding the runs of a sweep and reading what each wrote: the report's only contact with the
run folders (besides the fusion sweep's predictions.parquet, whose presence it notes).

A run is a folder holding both `metrics.json` and `config.yaml` (see `train.layout`); a folder
with only one of them is an unfinished or failed run, skipped with a note. Every file is parsed
before anything is written, so bad input ends the report with `ReportError` naming the file.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from fsspec.core import url_to_fs

from train.layout import CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILE, Run


class ReportError(ValueError):
    """Input the report cannot use; raised before anything is written."""


def find_runs(
    roots: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[list[Run], list[str]]:
    """Every run below `roots` (deduplicated, sorted by folder), and notes on folders that hold
    only one of metrics.json / config.yaml (unfinished or failed runs), which are skipped."""
    runs: dict[str, Run] = {}
    notes: list[str] = []
    for root in roots:
        fs, path = url_to_fs(root, **(storage_options or {}))
        path = path.rstrip("/") or "/"
        if not fs.isdir(path):
            what = "is a file, not a folder" if fs.exists(path) else "does not exist"
            raise ReportError(f"{root}: {what}; give the folder a sweep or run wrote into")
        names: dict[str, set[str]] = defaultdict(set)
        for file in fs.find(path):
            folder, _, base = file.rpartition("/")
            if base in (METRICS_FILE, CONFIG_FILE, PREDICTIONS_FILE):
                names[folder].add(base)
        remote = "://" in root

        def url(p: str, fs: Any = fs, remote: bool = remote) -> str:
            return fs.unstrip_protocol(p) if remote else p

        required = {METRICS_FILE, CONFIG_FILE}
        complete = sorted(d for d, n in names.items() if required <= n)
        partial = sorted(d for d, n in names.items() if n & required and not required <= n)
        for folder in partial:
            missing = (required - names[folder]).pop()
            notes.append(f"skipped {url(folder)}: no {missing} (unfinished or failed run?)")
        wanted = [f"{d}/{f}" for d in complete for f in (METRICS_FILE, CONFIG_FILE)]
        blobs = fs.cat(wanted) if wanted else {}
        for folder in complete:
            where = url(folder)
            if where in runs:
                continue
            metrics = _parse_metrics(blobs[f"{folder}/{METRICS_FILE}"], f"{where}/{METRICS_FILE}")
            config = _parse_config(blobs[f"{folder}/{CONFIG_FILE}"], f"{where}/{CONFIG_FILE}")
            # Keyed on the file, not the model class: any multi-task model that saves
            # predictions.parquet gets the fusion sweep.
            runs[where] = Run(where, metrics, config, PREDICTIONS_FILE in names[folder])
    if not runs:
        raise ReportError(
            f"no run found below {', '.join(roots)}: a run is a folder holding both "
            f"{METRICS_FILE} and {CONFIG_FILE} (written by `python -m train` when it finishes)"
            + (f"; {len(notes)} folder(s) hold only one of them" if notes else "")
        )
    return [runs[k] for k in sorted(runs)], notes


def _parse_metrics(blob: bytes, where: str) -> dict[str, float]:
    try:
        raw = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ReportError(f"{where}: expected an object of metric -> number")
    metrics = {}
    for key, value in raw.items():
        if value is None:  # the job writes NaN (undefined metric) as null
            value = math.nan
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ReportError(f"{where}: key {key!r} holds {value!r}, expected a number or null")
        metrics[str(key)] = float(value)
    return metrics


def _parse_config(blob: bytes, where: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(blob)
    except yaml.YAMLError as err:
        raise ReportError(f"{where}: not valid YAML ({err})") from err
    if not isinstance(config, dict):
        raise ReportError(f"{where}: expected a mapping (the resolved job config)")
    if "weights" in config and not isinstance(config["weights"], dict):
        raise ReportError(f"{where}: `weights` should be a mapping, got {config['weights']!r}")
    return config


def split_values(metrics: Mapping[str, float], split: str, oracle: bool) -> dict[str, float]:
    """One split's `"<behaviour>/<metric>"` -> value from a run's flat metrics.json keys: the
    model's own metrics, or (`oracle`) the `oracle_<metric>` ones with the prefix dropped."""
    values = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != split:
            continue
        _, behaviour, metric = parts
        if metric.startswith("oracle_") == oracle:
            values[f"{behaviour}/{metric.removeprefix('oracle_')}"] = value
    return values
