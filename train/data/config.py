"""The `data.*` keys as a user types them, checked before anything is read: the role keys -> a
checked `FeatureSpec` (each key's type: a list where a mapping belongs, a string where a list
belongs, a number where a column name belongs; and the roles against each other: at least one
feature column, no outcome among the inputs), and the reading settings (sizes, modes, workers).
Checkpoints rebuild their spec from plain, already checked values, with `FeatureSpec` alone;
the file layout keys are `train.data.io.TableFormat`'s."""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping
from typing import Any

from train.config_checks import (
    column_list,
    column_name,
    either,
    integer,
    is_int,
    is_list,
    number,
    one_of,
    optional,
    require,
    show,
)
from train.data.device import DEVICES
from train.data.features import DataConfigError, FeatureSpec
from train.data.vocabulary import VOCAB

MODES = ("memory", "stream", "auto")
URLS = either(
    (lambda v: isinstance(v, str), "a file, folder, glob or URL"),
    (
        lambda v: is_list(v) and bool(v) and all(isinstance(u, str) for u in v),
        "a list of them",
    ),
)
MAPPING = (lambda v: isinstance(v, Mapping), "a mapping (fsspec options)")


def parse_behaviours(
    behaviours: Mapping[str, Any],
) -> tuple[dict[str, str], dict[str, float]]:
    """`data.behaviours` -> (name -> column, name -> scale). A value is a column name or
    `{column: play_time_ms, scale: 0.001}` for a behaviour logged in other units."""
    columns: dict[str, str] = {}
    scales: dict[str, float] = {}
    for name, value in behaviours.items():
        if isinstance(value, Mapping):
            unknown = set(value) - {"column", "scale"}
            if unknown or "column" not in value:
                raise DataConfigError(
                    f"data.behaviours.{name}={dict(value)!r}: expected keys column (required) "
                    f"and scale; unknown {sorted(unknown)}"
                )
            value, scale = value["column"], value.get("scale")
            if scale is not None:
                scales[str(name)] = scale
        # A numbered column (`click: 7` in YAML) is the column named "7"; anything else but a
        # name is left for FeatureSpec to refuse, naming the behaviour.
        columns[str(name)] = str(value) if _is_name(value) else value
    return columns, scales


CATEGORICAL_FORMS = (
    "a list of columns (each gets an exact vocabulary: [user_id, item_id]), a mapping column -> "
    "hash buckets or vocab ({user_id: 100000, item_id: vocab}), or a list mixing both "
    "([user_id, {item_id: 500000}])"
)


def parse_categorical(categorical: Any) -> dict[str, Any]:
    """`data.categorical` in any of its forms -> column -> hash buckets or `vocab`."""
    error = DataConfigError
    if isinstance(categorical, Mapping):
        entries: list[Any] = [categorical]
    elif is_list(categorical):
        entries = list(categorical)
    else:
        raise error(f"data.categorical={show(categorical)}: expected {CATEGORICAL_FORMS}")
    columns: dict[str, Any] = {}
    for entry in entries:
        if isinstance(entry, Mapping):
            pairs = [(column_name("data.categorical", k, error), v) for k, v in entry.items()]
        elif _is_name(entry):
            pairs = [(str(entry), VOCAB)]
        else:
            raise error(
                f"data.categorical: entry {show(entry)} is neither a column name nor "
                f"{{column: buckets}}; expected {CATEGORICAL_FORMS}"
            )
        for column, value in pairs:
            if column in columns:
                raise error(f"data.categorical names column {column!r} twice")
            columns[column] = value
    return columns


def spec_from_config(
    categorical: Any,
    dense: Any,
    behaviours: Any,
    group_key: Any,
    oracle: Any = None,
    oracle_positive: Any = None,
    dense_fill: Any = "mean",
    sequences: Any = None,
    min_count: Any = 1,
) -> FeatureSpec:
    """The `data.*` role keys as typed -> a checked FeatureSpec. Every key is checked for its
    type (a list where a mapping belongs, a string where a list belongs, ...), and the roles
    against each other: at least one feature column, and no behaviour or oracle column among
    the features or the group key (the model would read the label it is trained on)."""
    error = DataConfigError
    buckets = parse_categorical(categorical)
    if sequences is not None and not isinstance(sequences, Mapping):
        raise error(
            f"data.sequences={show(sequences)}: expected a mapping list column -> "
            "{table: ..., max_len: ..., pooling: ...}, e.g. {hist_videos: {table: video_id, "
            "max_len: 30, pooling: mean}}"
        )
    lists = {column_name("data.sequences", k, error): v for k, v in (sequences or {}).items()}
    dense_columns = column_list("data.dense", dense, error)
    if not isinstance(behaviours, Mapping):
        raise error(
            f"data.behaviours={show(behaviours)}: expected a mapping behaviour -> column, "
            "e.g. {click: is_click, watch_time: {column: play_ms, scale: 0.001}}"
        )
    columns, scales = parse_behaviours(behaviours)
    key = column_name("data.group_key", group_key, error)
    oracles = {}
    for name, value in (("oracle", oracle), ("oracle_positive", oracle_positive)):
        if value is not None and not isinstance(value, Mapping):
            raise error(
                f"data.{name}={show(value)}: expected a mapping behaviour -> column (or null)"
            )
        oracles[name] = {
            str(b): column_name(f"data.{name}.{b}", c, error) for b, c in (value or {}).items()
        }
    if not buckets and not dense_columns and not lists:
        raise error(
            "data.categorical={} and data.dense=[]: expected at least one feature column "
            "(ids in data.categorical, numbers in data.dense)"
        )
    spec = FeatureSpec(
        categorical=buckets,
        dense=dense_columns,
        behaviours=columns,
        group_key=key,
        oracle=oracles["oracle"],
        oracle_positive=oracles["oracle_positive"],
        behaviour_scale=scales,
        dense_fill=dense_fill,
        sequences=lists,
        min_count=min_count,
    )
    check_roles(spec)
    return spec


def _is_name(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


def check_roles(spec: FeatureSpec) -> None:
    """No column the model reads (or groups by) holds an outcome: a behaviour as an input, or
    its oracle probability, leaks the label into the model and into every metric."""
    inputs = {c: "data.categorical" for c in spec.categorical}
    for column in spec.sequences:
        if column in inputs:
            raise DataConfigError(
                f"data.sequences.{column}: column {column!r} is also in data.categorical; "
                "expected a list column in one role (a sequence shares a categorical column's "
                "embeddings with table=<column>)"
            )
        inputs[column] = "data.sequences"
    inputs.update({c: "data.dense" for c in spec.dense})
    inputs.setdefault(spec.group_key, "data.group_key")
    outcomes = {c: f"data.behaviours.{b}" for b, c in spec.behaviours.items()}
    for kind in ("oracle", "oracle_positive"):
        for b, c in getattr(spec, kind).items():
            outcomes.setdefault(c, f"data.{kind}.{b}")
    for column, role in inputs.items():
        if column in outcomes:
            raise DataConfigError(
                f"{role} uses column {column!r}, which is also {outcomes[column]}: expected "
                "features known before the impression; an outcome among the inputs leaks the "
                "label (use each column in one role)"
            )


def check_settings(
    *,
    urls: Mapping[str, Any],
    simulated: bool,
    storage_options: Any,
    batch_size: Any,
    eval_batch_size: Any,
    seed: Any,
    mode: Any,
    memory_limit_gb: Any,
    num_workers: Any,
    shuffle_buffer: Any,
    worker_start: Any,
    device: Any,
) -> None:
    """The data module's reading settings, each in its domain (`data.<key>=<value>: expected`)."""
    error = DataConfigError
    for split, url in urls.items():
        require(f"data.{split}", url, optional(URLS), error)
    if not simulated:
        for split, url in urls.items():
            if not url:
                raise error(
                    f"data.{split} is not set: expected a file, folder, glob or URL (or a list "
                    "of them)"
                )
    else:
        given = [f"data.{s}" for s, url in urls.items() if url]
        if given:
            raise error(
                f"{', '.join(given)} set, but data=synthetic simulates its splits: expected "
                "data=files to read files (or leave them null)"
            )
    require("data.storage_options", storage_options, optional(MAPPING), error)
    require("data.batch_size", batch_size, integer(1), error)
    require("data.eval_batch_size", eval_batch_size, integer(1), error)
    require("data.seed", seed, integer(0), error)
    if not isinstance(mode, str) or mode not in MODES:
        raise error(f"data.mode must be one of {MODES}, got {mode!r}")
    require("data.memory_limit_gb", memory_limit_gb, number(0.0, low_open=True), error)
    if not is_int(num_workers) or num_workers < 0:
        raise error(
            "data.num_workers must be >= 0 (reader processes; 0 reads in the training process), "
            f"got {num_workers!r}"
        )
    require("data.shuffle_buffer", shuffle_buffer, integer(1), error)
    methods = multiprocessing.get_all_start_methods()
    if worker_start not in methods:
        raise error(
            f"data.worker_start={worker_start!r} is not available here: expected one of "
            f"{', '.join(methods)}"
        )
    require("data.device", device, one_of(*DEVICES), error)
    if simulated and mode == "stream":
        raise error(
            "data.mode=stream reads files; the simulator lives in memory. Write its splits with "
            "`python -m train.data.synthetic OUT` and stream them with data=files"
        )
