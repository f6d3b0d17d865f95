"""The data contract: which columns are ids, dense features, behaviours; and how raw Arrow
columns become a `Batch` (hashing ids into buckets, checking types and values)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from train.data.batch import Batch

NULL_BUCKET = 0
"""Nulls of a categorical column all land here; hashed ids use buckets 1..n-1."""


class DataError(ValueError):
    """Input data that does not satisfy the contract; the message names file and column."""


@dataclass(frozen=True)
class FeatureSpec:
    """Which columns play which role. Everything else in the files is ignored."""

    categorical: Mapping[str, int]
    """column -> number of hash buckets (>= 2: bucket 0 is reserved for nulls)."""
    dense: Sequence[str]
    behaviours: Mapping[str, str]
    """behaviour name -> column, e.g. {click: is_click, watch_time: play_s}."""
    group_key: str
    oracle: Mapping[str, str] = field(default_factory=dict)
    """behaviour name -> column holding its true P(b) (binary) or E[b] (continuous)."""
    oracle_positive: Mapping[str, str] = field(default_factory=dict)
    """behaviour name -> column holding its true P(b > 0), for continuous behaviours."""

    def __post_init__(self) -> None:
        if not self.behaviours:
            raise DataError("data.behaviours is empty: name at least the label behaviour")
        for column, buckets in self.categorical.items():
            if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 2:
                raise DataError(
                    f"data.categorical.{column}: expected a number of hash buckets >= 2, "
                    f"got {buckets!r}"
                )
        for name in list(self.oracle) + list(self.oracle_positive):
            if name not in self.behaviours:
                raise DataError(
                    f"data.oracle names behaviour {name!r}, which is not in data.behaviours "
                    f"{sorted(self.behaviours)}"
                )
        for name in self.oracle_positive:
            if name not in self.oracle:
                raise DataError(f"data.oracle_positive.{name} needs data.oracle.{name} too")

    @property
    def behaviour_names(self) -> list[str]:
        return list(self.behaviours)

    @property
    def oracle_names(self) -> list[str]:
        return [b for b in self.behaviours if b in self.oracle]

    @property
    def columns(self) -> list[str]:
        """Every column read from the files, each once."""
        names = [
            *self.categorical,
            *self.dense,
            *self.behaviours.values(),
            self.group_key,
            *self.oracle.values(),
            *self.oracle_positive.values(),
        ]
        return list(dict.fromkeys(names))

    @property
    def cardinalities(self) -> list[int]:
        return list(self.categorical.values())


def hash_ids(column: pa.Array | pa.ChunkedArray, buckets: int | None = None) -> np.ndarray:
    """Stable hash of raw ids (ints or strings, any range) -> int64.

    With `buckets`, maps to 1..buckets-1 and nulls to NULL_BUCKET. The hash is pandas'
    `hash_array` (SipHash-2-4 for strings, a splitmix64 finaliser for integers), which is
    stable across runs, machines and versions, so a serving system can reproduce it.
    """
    values, nulls = _id_values(column)
    hashed = pd.util.hash_array(values, categorize=True).view(np.int64)
    if buckets is None:
        return hashed
    out = (hashed.view(np.uint64) % np.uint64(buckets - 1)).astype(np.int64) + 1
    if nulls is not False:
        out[nulls] = NULL_BUCKET
    return out


def _id_values(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | bool]:
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = kind.value_type
    nulls: np.ndarray | bool = False
    if column.null_count:
        nulls = column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return column.fill_null(0).cast(pa.int64()).to_numpy(), nulls
    if pa.types.is_floating(kind):
        # Integer ids read from CSV with missing values arrive as floats: hash them as ints so
        # they match the same ids read as integers elsewhere.
        filled = column.fill_null(0)
        as_int = filled.cast(pa.int64(), safe=False)
        if not pc.all(pc.equal(as_int.cast(kind), filled)).as_py():
            raise TypeError("non-integral float ids")
        return as_int.to_numpy(), nulls
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column.fill_null("").to_numpy(zero_copy_only=False).astype(object), nulls
    raise TypeError(f"ids of type {kind}")


def featurize(table: pa.Table, spec: FeatureSpec, source: str) -> Batch:
    """Arrow columns -> a `Batch`; `source` names the file or split in error messages."""
    missing = [c for c in spec.columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; the data config expects {spec.columns}, "
            f"the file has {table.column_names}"
        )
    categorical = np.empty((table.num_rows, len(spec.categorical)), dtype=np.int64)
    for j, (column, buckets) in enumerate(spec.categorical.items()):
        try:
            categorical[:, j] = hash_ids(table.column(column), buckets)
        except TypeError as err:
            raise DataError(
                f"{source}: categorical column {column!r} has {table.column(column).type}; "
                "expected integer or string ids"
            ) from err
    dense = (
        np.stack([_float_column(table, c, source, "dense") for c in spec.dense], axis=1)
        if spec.dense
        else np.zeros((table.num_rows, 0), dtype=np.float32)
    )
    behaviours = np.stack(
        [_behaviour_column(table, col, name, source) for name, col in spec.behaviours.items()],
        axis=1,
    )
    try:
        group = hash_ids(table.column(spec.group_key))
    except TypeError as err:
        raise DataError(
            f"{source}: group_key column {spec.group_key!r} has "
            f"{table.column(spec.group_key).type}; expected integer or string ids"
        ) from err
    oracle = oracle_positive = None
    if spec.oracle:
        names = spec.oracle_names
        oracle = np.stack(
            [_float_column(table, spec.oracle[b], source, "oracle") for b in names], axis=1
        )
        oracle_positive = np.stack(
            [
                _float_column(table, spec.oracle_positive.get(b, spec.oracle[b]), source, "oracle")
                for b in names
            ],
            axis=1,
        )
    return Batch(
        categorical=torch.from_numpy(categorical),
        dense=torch.from_numpy(dense),
        behaviours=torch.from_numpy(behaviours),
        group=torch.from_numpy(group),
        oracle=None if oracle is None else torch.from_numpy(oracle),
        oracle_positive=None if oracle_positive is None else torch.from_numpy(oracle_positive),
    )


def _float_column(table: pa.Table, column: str, source: str, role: str) -> np.ndarray:
    data = table.column(column)
    if not (
        pa.types.is_integer(data.type)
        or pa.types.is_floating(data.type)
        or pa.types.is_boolean(data.type)
        or pa.types.is_null(data.type)
    ):
        raise DataError(
            f"{source}: {role} column {column!r} has type {data.type}; expected numbers"
        )
    return data.cast(pa.float32()).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def _behaviour_column(table: pa.Table, column: str, name: str, source: str) -> np.ndarray:
    values = _float_column(table, column, source, f"behaviour {name!r}")
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source}: behaviour {name!r} (column {column!r}) has {int(bad.sum())} value(s) that "
            f"are null, NaN, infinite or negative (first at row {first}: {values[first]!r}); "
            "behaviours must be finite and >= 0"
        )
    return values
