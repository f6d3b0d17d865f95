"""The data contract: which columns are ids, list columns, dense features, behaviours; and how
raw Arrow columns become a `Batch` (ids hashed into buckets or looked up in a vocabulary, lists
cut to their last `max_len` elements, types and values checked).

Longer than 450 lines because the contract and the code that applies it to Arrow columns are
one fact: every check here names the key or column whose encoding it guards."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from train.config_checks import show
from train.data.batch import POOLINGS, Batch, SequenceInput
from train.data.vocabulary import (
    VOCAB,
    Vocabulary,
    canonical_ids,
    id_kind_of,
)
from train.errors import ConfigError, UpweightError
from train.outputs import plain
from train.preprocess import DENSE_FILLS

NULL_BUCKET = 0
"""Nulls of a categorical column all land here; hashed ids use buckets 1..n-1."""


class DataError(UpweightError):
    """Input data that does not satisfy the contract; the message names file and column."""


class DataConfigError(DataError, ConfigError):
    """A `data.*` config value outside its domain (both a data and a config error)."""


@dataclass(frozen=True)
class SequenceSpec:
    """One list column (`data.sequences.<column>`): its last `max_len` elements, embedded in a
    table shared with the categorical column `table`, or in its own (`buckets`: a number of
    hash buckets, or `vocab`, the default), then pooled (`POOLINGS`)."""

    max_len: int
    pooling: str = "mean"
    table: str | None = None
    buckets: int | str | None = None

    @property
    def encoding(self) -> int | str:
        """Its own table's hash buckets or `vocab` (a sequence with a shared table has none)."""
        return VOCAB if self.buckets is None else self.buckets


SEQUENCE_KEYS = ("table", "buckets", "max_len", "pooling")


@dataclass(frozen=True)
class FeatureSpec:
    """Which columns play which role. Everything else in the files is ignored."""

    categorical: Mapping[str, int | str]
    """column -> number of hash buckets (>= 2: bucket 0 is reserved for nulls), or `vocab`: an
    exact vocabulary of the training split (`train.data.vocabulary`)."""
    dense: Sequence[str]
    behaviours: Mapping[str, str]
    """behaviour name -> column, e.g. {click: is_click, watch_time: play_s}."""
    group_key: str
    oracle: Mapping[str, str] = field(default_factory=dict)
    """behaviour name -> column holding its true P(b) (binary) or E[b] (continuous)."""
    oracle_positive: Mapping[str, str] = field(default_factory=dict)
    """behaviour name -> column holding its true P(b > 0), for continuous behaviours."""
    behaviour_scale: Mapping[str, float] = field(default_factory=dict)
    """behaviour name -> factor applied to its column (e.g. 0.001: milliseconds -> seconds)."""
    dense_fill: str = "mean"
    """How a missing (NaN) dense value is filled before standardising: `mean` (the training
    mean) or `zero` (see `train.preprocess`)."""
    sequences: Mapping[str, SequenceSpec] = field(default_factory=dict)
    """list column -> how it is embedded and pooled."""
    min_count: int = 1
    """Vocabulary ids seen fewer times than this in training share the out-of-vocabulary row."""
    vocabularies: Mapping[str, Vocabulary] = field(default_factory=dict)
    """table -> its vocabulary, learned from the training split (`with_vocabularies`)."""

    def __post_init__(self) -> None:
        sequences = {
            str(c): s if isinstance(s, SequenceSpec) else _sequence(c, s)
            for c, s in self.sequences.items()
        }
        object.__setattr__(self, "sequences", sequences)
        self._check_sequences()
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int):
            raise DataConfigError(
                f"data.min_count={show(self.min_count)}: expected an integer >= 1"
            )
        if self.min_count < 1:
            raise DataConfigError(f"data.min_count={self.min_count}: expected an integer >= 1")
        if self.dense_fill not in DENSE_FILLS:
            raise DataConfigError(
                f"data.dense_fill must be one of {DENSE_FILLS}, got {self.dense_fill!r}"
            )
        if not self.behaviours:
            raise DataConfigError(
                "data.behaviours={}: expected at least one behaviour (the label), e.g. "
                "{click: is_click}"
            )
        for name, column in self.behaviours.items():
            if not isinstance(column, str) or not column:
                raise DataConfigError(
                    f"data.behaviours.{name}={show(column)}: expected a column name or "
                    "{column: NAME, scale: FACTOR}"
                )
        for name, scale in self.behaviour_scale.items():
            if name not in self.behaviours:
                raise DataConfigError(
                    f"a scale is given for {name!r}, which is not in data.behaviours"
                )
            if (
                isinstance(scale, bool)
                or not isinstance(scale, int | float)
                or not math.isfinite(scale)
                or scale <= 0
            ):
                raise DataConfigError(
                    f"data.behaviours.{name}.scale must be a finite number > 0, got {scale!r}"
                )
        for column, buckets in self.categorical.items():
            _check_encoding(f"data.categorical.{column}", buckets)
        for name in list(self.oracle) + list(self.oracle_positive):
            if name not in self.behaviours:
                raise DataConfigError(
                    f"data.oracle names behaviour {name!r}, which is not in data.behaviours "
                    f"{sorted(self.behaviours)}"
                )
        for name in self.oracle_positive:
            if name not in self.oracle:
                raise DataConfigError(f"data.oracle_positive.{name} needs data.oracle.{name} too")

    def _check_sequences(self) -> None:
        for column, seq in self.sequences.items():
            key = f"data.sequences.{column}"
            if isinstance(seq.max_len, bool) or not isinstance(seq.max_len, int) or seq.max_len < 1:
                raise DataConfigError(
                    f"{key}.max_len={show(seq.max_len)}: expected an integer >= 1 (the last "
                    "max_len elements of each list are kept)"
                )
            if seq.pooling not in POOLINGS:
                raise DataConfigError(
                    f"{key}.pooling={show(seq.pooling)}: expected one of {', '.join(POOLINGS)}"
                )
            if seq.table is not None and seq.buckets is not None:
                raise DataConfigError(
                    f"{key}: both table={seq.table!r} and buckets={seq.buckets!r}: expected one "
                    "(table: share a categorical column's embeddings; buckets: its own table)"
                )
            if seq.table is not None and seq.table not in self.categorical:
                raise DataConfigError(
                    f"{key}.table={show(seq.table)}: expected a column of data.categorical "
                    f"{list(self.categorical)} (whose vocabulary and embeddings it shares)"
                )
            if seq.buckets is not None:
                _check_encoding(f"{key}.buckets", seq.buckets)
            if seq.pooling == "attention" and seq.table is None:
                raise DataConfigError(
                    f"{key}.pooling=attention attends to the candidate's embedding in the same "
                    "table: expected table=<a column of data.categorical> (e.g. the item id)"
                )

    def with_vocabularies(self, vocabularies: Mapping[str, Vocabulary]) -> FeatureSpec:
        return replace(self, vocabularies=dict(vocabularies))

    @property
    def tables(self) -> dict[str, int | str]:
        """Embedding table -> its hash buckets or `vocab`, in the network's order: one per
        categorical column, then one per list column with a table of its own."""
        tables = dict(self.categorical)
        for column, seq in self.sequences.items():
            if seq.table is None:
                tables[column] = seq.encoding
        return tables

    def table_of(self, column: str) -> str:
        """The table a categorical or list column's ids index."""
        seq = self.sequences.get(column)
        return seq.table or column if seq is not None else column

    def table_columns(self, table: str) -> list[str]:
        """The columns whose ids a table embeds (its own, and the lists that share it)."""
        return [c for c in [*self.categorical, *self.sequences] if self.table_of(c) == table]

    @property
    def cardinalities(self) -> list[int]:
        """Rows of every embedding table, in `tables` order (vocabularies must be built)."""
        sizes = []
        for table, encoding in self.tables.items():
            if encoding != VOCAB:
                sizes.append(int(encoding))
            elif table in self.vocabularies:
                sizes.append(self.vocabularies[table].size)
            else:
                raise DataError(
                    f"table {table!r} has no vocabulary yet: it is built from the training split "
                    "by the data module's prepare()"
                )
        return sizes

    @property
    def list_width(self) -> int:
        """Columns of `Batch.sequences`: every list column's `max_len`, side by side."""
        return sum(seq.max_len for seq in self.sequences.values())

    @property
    def sequence_inputs(self) -> tuple[SequenceInput, ...]:
        """The list columns as the network sees them, in `Batch.sequences` order."""
        tables = list(self.tables)
        columns = list(self.categorical)
        return tuple(
            SequenceInput(
                table=tables.index(self.table_of(c)),
                max_len=seq.max_len,
                pooling=seq.pooling,
                candidate=columns.index(seq.table) if seq.pooling == "attention" else None,
                own_table=seq.table is None,
            )
            for c, seq in self.sequences.items()
        )

    @property
    def network_options(self) -> dict[str, Any]:
        """What a ranking network is built with besides (cardinalities, num_dense): the list
        columns, when there are any (a network written without them still plugs in)."""
        return {"sequences": self.sequence_inputs} if self.sequences else {}

    def state(self) -> dict[str, Any]:
        """Plain values for a checkpoint (`from_state` reads them back)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["sequences"] = {c: asdict(s) for c, s in self.sequences.items()}
        state["vocabularies"] = {t: v.state() for t, v in self.vocabularies.items()}
        return plain(state)

    @staticmethod
    def from_state(state: Mapping[str, Any]) -> FeatureSpec:
        state = dict(state)
        state["vocabularies"] = {
            t: Vocabulary.from_state(v) for t, v in (state.get("vocabularies") or {}).items()
        }
        return FeatureSpec(**state)

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
            *self.sequences,
            *self.dense,
            *self.behaviours.values(),
            self.group_key,
            *self.oracle.values(),
            *self.oracle_positive.values(),
        ]
        return list(dict.fromkeys(names))

    @property
    def id_columns(self) -> list[str]:
        """Columns hashed as ids: the categorical features and the GAUC group key."""
        return list(dict.fromkeys([*self.categorical, self.group_key]))

    @property
    def numeric_columns(self) -> dict[str, str]:
        """column -> role, for every column that must hold numbers."""
        roles: dict[str, str] = {}
        for column in self.dense:
            roles.setdefault(column, "dense")
        for name, column in self.behaviours.items():
            roles.setdefault(column, f"behaviour {name!r}")
        for column in [*self.oracle.values(), *self.oracle_positive.values()]:
            roles.setdefault(column, "oracle")
        return roles


def _sequence(column: str, value: Any) -> SequenceSpec:
    key = f"data.sequences.{column}"
    if not isinstance(value, Mapping):
        raise DataConfigError(
            f"{key}={show(value)}: expected a mapping, e.g. {{table: video_id, max_len: 30, "
            "pooling: mean}}"
        )
    unknown = sorted(set(map(str, value)) - set(SEQUENCE_KEYS))
    if unknown:
        raise DataConfigError(f"{key}: unknown key(s) {unknown}; expected {list(SEQUENCE_KEYS)}")
    if "max_len" not in value:
        raise DataConfigError(
            f"{key}.max_len is missing: expected how many of the last elements of each list to keep"
        )
    table = value.get("table")
    if table is not None and not isinstance(table, str):
        raise DataConfigError(f"{key}.table={show(table)}: expected a column of data.categorical")
    return SequenceSpec(
        max_len=value["max_len"],
        pooling=value.get("pooling", "mean"),
        table=table,
        buckets=value.get("buckets"),
    )


def _check_encoding(key: str, value: Any) -> None:
    if value == VOCAB:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise DataConfigError(
            f"{key}={show(value)}: expected an integer >= 2 (hash buckets; bucket 0 holds "
            f"nulls) or {VOCAB} (an exact vocabulary of the training split)"
        )


ID_TYPES = "integer, boolean, integral float or string"
id_kind = id_kind_of
"""`int` or `string` (what hashing sees), None when the type cannot hold ids."""


def is_list_type(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def is_numeric(kind: pa.DataType) -> bool:
    """Types read as float32 numbers: ints (any size: large ones lose precision, as float32
    does), floats, decimals (SQL exports), booleans, and all-null columns."""
    return (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_null(kind)
    )


def _expected_numbers(kind: pa.DataType) -> str:
    if pa.types.is_temporal(kind):
        return (
            "expected numbers; a date or time is not a feature value as is (convert it, e.g. "
            "to an age in days, or leave the column out)"
        )
    if pa.types.is_dictionary(kind):
        return "expected numbers, not categories (list an id column in data.categorical)"
    return "expected numbers"


def check_schema(schema: pa.Schema, spec: FeatureSpec, source: str) -> dict[str, str]:
    """Check column presence and types without reading rows; return id column -> id kind (so
    a caller can check that every shard hashes a column the same way)."""
    missing = [c for c in spec.columns if c not in schema.names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; the data config reads {spec.columns}, "
            f"the file has {schema.names}"
        )
    twice = [c for c in spec.columns if schema.names.count(c) > 1]
    if twice:
        raise DataError(
            f"{source}: column(s) {twice} appear more than once in the file's columns "
            f"{schema.names}; expected each column the data config reads to be named once"
        )
    kinds: dict[str, str] = {}
    for column in spec.id_columns:
        kind = id_kind(schema.field(column).type)
        if kind is None:
            role = "group_key" if column == spec.group_key else "categorical"
            raise DataError(
                f"{source}: {role} column {column!r} has type {schema.field(column).type}; "
                f"expected {ID_TYPES} ids"
            )
        kinds[column] = kind
    for column in spec.sequences:
        kind = schema.field(column).type
        element = id_kind(kind.value_type) if is_list_type(kind) else None
        if element is None:
            raise DataError(f"{source}: {_list_type_error(column, kind)}")
        kinds[column] = element
    for column, role in spec.numeric_columns.items():
        kind = schema.field(column).type
        if not is_numeric(kind):
            raise DataError(
                f"{source}: {_where(role, column)} has type {kind}; {_expected_numbers(kind)}"
            )
    return kinds


def hash_ids(column: pa.Array | pa.ChunkedArray, buckets: int | None = None) -> np.ndarray:
    """Stable hash of raw ids (ints or strings, any range) -> int64.

    With `buckets`, maps to 1..buckets-1 and nulls to NULL_BUCKET. The hash is pandas'
    `hash_array` (SipHash-2-4 for strings, a splitmix64 finaliser for integers), which is
    stable across runs, machines and versions, so a serving system can reproduce it. Strings
    are hashed once per distinct value (dictionary-encoded first): same result, far cheaper.
    """
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 1:
            return hash_ids(column.chunk(0), buckets)
        parts = [hash_ids(chunk, buckets) for chunk in column.chunks]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        column = pc.dictionary_encode(column)
        kind = column.type
    if pa.types.is_dictionary(kind):
        return _hash_dictionary(column, buckets)
    values, nulls = _id_values(column)
    return _to_buckets(pd.util.hash_array(values, categorize=False).view(np.int64), nulls, buckets)


def _to_buckets(hashed: np.ndarray, nulls: np.ndarray | bool, buckets: int | None) -> np.ndarray:
    if buckets is None:
        return hashed
    out = (hashed.view(np.uint64) % np.uint64(buckets - 1)).astype(np.int64) + 1
    if nulls is not False:
        out[nulls] = NULL_BUCKET
    return out


def _hash_dictionary(column: pa.DictionaryArray, buckets: int | None) -> np.ndarray:
    # The dictionary plus the value nulls hash as (0 or ""), hashed once per distinct value.
    fill = pa.array([""] if _is_text(column.type.value_type) else [0], column.type.value_type)
    distinct = pa.concat_arrays([column.dictionary.cast(column.type.value_type), fill])
    values, missing = _id_values(distinct)
    hashed = pd.util.hash_array(values, categorize=False).view(np.int64)
    indices = column.indices
    nulls: np.ndarray | bool = False
    if column.null_count:
        nulls = indices.is_null().to_numpy(zero_copy_only=False)
    codes = indices.fill_null(len(distinct) - 1).cast(pa.int64()).to_numpy()
    if missing is not False:  # NaN among float ids: missing, like a null
        nulls = nulls | missing[codes]
    return _to_buckets(hashed[codes], nulls, buckets)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _id_values(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | bool]:
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = kind.value_type
    nulls: np.ndarray | bool = False
    if column.null_count:
        nulls = column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind):
        # uint64 ids above 2**63 wrap to their int64 bit pattern (distinct ids stay distinct,
        # as in serve.py's numpy path); every smaller id keeps its value.
        return column.cast(pa.int64(), safe=False).fill_null(0).to_numpy(), nulls
    if pa.types.is_floating(kind):
        # Integer ids read from CSV with missing values arrive as floats: hash them as ints so
        # they match the same ids read as integers elsewhere. NaN (pandas' missing) is a null.
        nan = pc.is_nan(column).fill_null(False)
        if pc.any(nan).as_py():
            nan_mask = nan.to_numpy(zero_copy_only=False)
            nulls = nan_mask if nulls is False else (nulls | nan_mask)
            column = pc.if_else(nan, pa.scalar(None, kind), column)
        filled = column.fill_null(0)
        if not pc.all(pc.is_finite(filled)).as_py():
            raise TypeError("infinite float ids")
        as_int = filled.cast(pa.int64(), safe=False)
        if not pc.all(pc.equal(as_int.cast(kind), filled)).as_py():
            raise TypeError("non-integral float ids")
        return as_int.to_numpy(), nulls
    if _is_text(kind):
        return column.fill_null("").to_numpy(zero_copy_only=False).astype(object), nulls
    raise TypeError(f"ids of type {kind}")


def check_ids(table: pa.Table, spec: FeatureSpec, source: str) -> None:
    """The value checks of id columns that a schema cannot show (integral floats)."""
    for column in spec.id_columns:
        if column in table.column_names and pa.types.is_floating(table.column(column).type):
            _hash_checked(table, column, None, source, spec)


def _hash_checked(
    table: pa.Table, column: str, buckets: int | None, source: str, spec: FeatureSpec
) -> np.ndarray:
    try:
        return hash_ids(table.column(column), buckets)
    except (TypeError, pa.ArrowInvalid) as err:
        role = "group_key" if column == spec.group_key else "categorical"
        raise DataError(
            f"{source}: {role} column {column!r} has {table.column(column).type} "
            f"({err}); expected {ID_TYPES} ids"
        ) from err


def numeric_block(table: pa.Table, spec: FeatureSpec, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked dense [rows, D] and behaviour [rows, K] float32 matrices of `table`: the inputs of
    the training statistics, identical to what `featurize` puts in a Batch."""
    return dense_matrix(table, spec, source), behaviour_matrix(table, spec, source)


def dense_matrix(table: pa.Table, spec: FeatureSpec, source: str) -> np.ndarray:
    """Raw dense features [rows, D] float32, NaN where missing."""
    if not spec.dense:
        return np.zeros((table.num_rows, 0), dtype=np.float32)
    return np.stack([_dense_column(table, c, source) for c in spec.dense], axis=1)


def behaviour_matrix(table: pa.Table, spec: FeatureSpec, source: str) -> np.ndarray:
    """Checked behaviours [rows, K] float32, scaled to their units."""
    return np.stack(
        [
            _behaviour_column(table, col, name, source, spec.behaviour_scale.get(name))
            for name, col in spec.behaviours.items()
        ],
        axis=1,
    )


def model_inputs(
    table: pa.Table, spec: FeatureSpec, source: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What the model reads of `table`: ids as table rows [rows, C] int64 (hashed or looked up
    in the vocabulary), raw dense [rows, D] float32 (NaN kept: `train.preprocess` fills it) and
    the list columns [rows, Σ max_len] int64 (None without any). Training and prediction both
    call this."""
    reads = [*spec.categorical, *spec.sequences, *spec.dense]
    missing = [c for c in reads if c not in table.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; the model reads {reads}, the file has "
            f"{table.column_names}"
        )
    categorical = np.empty((table.num_rows, len(spec.categorical)), dtype=np.int64)
    for j, column in enumerate(spec.categorical):
        categorical[:, j] = _encode_checked(table.column(column), column, column, spec, source)
    dense = dense_matrix(table, spec, source)
    sequences = sequence_matrix(table, spec, source)
    return (
        torch.from_numpy(categorical),
        torch.from_numpy(dense),
        None if sequences is None else torch.from_numpy(sequences),
    )


def _encode_checked(
    ids: pa.Array | pa.ChunkedArray, column: str, table: str, spec: FeatureSpec, source: str
) -> np.ndarray:
    """Ids of `column` -> rows of `table`: its hash buckets, or its vocabulary's indices."""
    encoding = spec.tables[table]
    if encoding != VOCAB:
        try:
            return hash_ids(ids, int(encoding))
        except (TypeError, pa.ArrowInvalid) as err:
            raise DataError(
                f"{source}: {_id_role(column, spec)} column {column!r} has {ids.type} ({err}); "
                f"expected {ID_TYPES} ids"
            ) from err
    vocabulary = spec.vocabularies.get(table)
    if vocabulary is None:
        raise DataError(f"{source}: table {table!r} has no vocabulary (prepare() builds it)")
    try:
        return vocabulary.encode(canonical_ids(ids))
    except (TypeError, pa.ArrowInvalid) as err:
        raise DataError(
            f"{source}: {_id_role(column, spec)} column {column!r} has {ids.type} ({err}); "
            f"expected {ID_TYPES} ids of the type table {table!r} was trained with"
        ) from err


def _id_role(column: str, spec: FeatureSpec) -> str:
    if column in spec.sequences:
        return "list"
    return "group_key" if column == spec.group_key else "categorical"


def _list_type_error(column: str, kind: pa.DataType) -> str:
    return (
        f"list column {column!r} (data.sequences.{column}) has type {kind}; expected a list of "
        f"ids (Parquet list<int|string>, or CSV cells split by data.list_delimiter)"
    )


def list_elements(
    table: pa.Table, column: str, spec: FeatureSpec, source: str
) -> tuple[pa.Array, np.ndarray]:
    """A list column's elements (nulls and empty lists hold none) as ids of its table's type,
    and each element's row. Elements of a table whose column holds integer ids are integers,
    also when they arrive as text (CSV cells)."""
    data = table.column(column)
    if not is_list_type(data.type):
        raise DataError(f"{source}: {_list_type_error(column, data.type)}")
    lists = data.combine_chunks() if isinstance(data, pa.ChunkedArray) else data
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
    values = pc.list_flatten(lists)
    shared = spec.sequences[column].table
    if (
        shared is not None
        and shared in table.column_names
        and id_kind(table.column(shared).type) == "int"
        and not pa.types.is_null(table.column(shared).type)
        and id_kind(values.type) == "string"
    ):
        values = _integers(values, rows, column, shared, source)
    return values, rows


def _integers(
    values: pa.Array, rows: np.ndarray, column: str, shared: str, source: str
) -> pa.Array:
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    spelt = pc.match_substring_regex(values, r"^\s*[-+]?[0-9]+\s*$").fill_null(True)
    bad = np.flatnonzero(~spelt.to_numpy(zero_copy_only=False))
    if len(bad):
        first = int(bad[0])
        raise DataError(
            f"{source}: list column {column!r} row {int(rows[first])}: element "
            f"{values[first].as_py()!r} is not an integer id; its table {shared!r} holds "
            "integer ids (a cell that is not a list of them, or the wrong data.list_delimiter?)"
        )
    return pc.cast(pc.utf8_trim_whitespace(values), pa.int64())


def table_ids(table: pa.Table, spec: FeatureSpec, source: str) -> dict[str, list[pa.Array]]:
    """What the id pass counts of `table`, per embedding table: the ids of its column and of the
    lists that share it, canonical (vocabulary tables) or as 64-bit hashes (hashed tables, for
    their collision rate); nulls left out."""
    found: dict[str, list[pa.Array]] = {name: [] for name in spec.tables}
    for column in [*spec.categorical, *spec.sequences]:
        name = spec.table_of(column)
        if column in spec.sequences:
            ids: pa.Array | pa.ChunkedArray = list_elements(table, column, spec, source)[0]
        else:
            ids = table.column(column)
        try:
            canonical = canonical_ids(ids).drop_null()
            if spec.tables[name] != VOCAB:
                canonical = pa.array(hash_ids(canonical))
        except (TypeError, pa.ArrowInvalid) as err:
            raise DataError(
                f"{source}: {_id_role(column, spec)} column {column!r} has {ids.type} ({err}); "
                f"expected {ID_TYPES} ids"
            ) from err
        found[name].append(canonical)
    return found


def sequence_matrix(table: pa.Table, spec: FeatureSpec, source: str) -> np.ndarray | None:
    """Every list column's last `max_len` elements as rows of its table, padded with 0:
    [rows, Σ max_len] int64 (None when the spec has no list column). Vectorised: the elements
    of all rows are encoded at once and scattered into place."""
    if not spec.sequences:
        return None
    parts = []
    for column, seq in spec.sequences.items():
        values, rows = list_elements(table, column, spec, source)
        codes = _encode_checked(values, column, spec.table_of(column), spec, source)
        lengths = np.bincount(rows, minlength=table.num_rows)
        starts = np.cumsum(lengths) - lengths
        position = np.arange(len(rows)) - starts[rows]
        dropped = np.maximum(lengths - seq.max_len, 0)[rows]
        keep = position >= dropped
        out = np.zeros((table.num_rows, seq.max_len), dtype=np.int64)
        out[rows[keep], (position - dropped)[keep]] = codes[keep]
        parts.append(out)
    return np.concatenate(parts, axis=1)


def featurize(table: pa.Table, spec: FeatureSpec, source: str) -> Batch:
    """Arrow columns -> a `Batch`; `source` names the file or split in error messages."""
    missing = [c for c in spec.columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; the data config expects {spec.columns}, "
            f"the file has {table.column_names}"
        )
    categorical, dense, sequences = model_inputs(table, spec, source)
    behaviours = behaviour_matrix(table, spec, source)
    group = _hash_checked(table, spec.group_key, None, source, spec)
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
        categorical=categorical,
        dense=dense,
        behaviours=torch.from_numpy(behaviours),
        group=torch.from_numpy(group),
        oracle=None if oracle is None else torch.from_numpy(oracle),
        oracle_positive=None if oracle_positive is None else torch.from_numpy(oracle_positive),
        sequences=sequences,
    )


def _float_column(table: pa.Table, column: str, source: str, role: str) -> np.ndarray:
    data = table.column(column)
    if not is_numeric(data.type):
        raise DataError(
            f"{source}: {_where(role, column)} has type {data.type}; {_expected_numbers(data.type)}"
        )
    # Unsafe: an int beyond 2**24 (milliseconds, byte counts) rounds as float32 does, instead
    # of Arrow refusing it; a value beyond float32's range becomes inf (refused by the caller).
    values = data.cast(pa.float32(), safe=False)
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def _dense_column(table: pa.Table, column: str, source: str) -> np.ndarray:
    """One dense feature as float32, NaN where missing; infinity is refused."""
    values = _float_column(table, column, source, "dense")
    infinite = np.isinf(values)
    if infinite.any():
        raise DataError(
            f"{source}: dense column {column!r} has {int(infinite.sum())} infinite value(s) "
            f"(e.g. {float(values[infinite][0])}); expected finite numbers (null or NaN marks a "
            "missing value; beyond float32's ±3.4e38 a value overflows to infinity)"
        )
    return values


def _where(role: str, column: str) -> str:
    if role.startswith("behaviour"):
        return f"{role} (column {column!r})"
    return f"{role} column {column!r}"


def _behaviour_column(
    table: pa.Table, column: str, name: str, source: str, scale: float | None = None
) -> np.ndarray:
    values = _float_column(table, column, source, f"behaviour {name!r}")
    if scale is not None and scale != 1:
        values = values * np.float32(scale)
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source}: behaviour {name!r} (column {column!r}) has {int(bad.sum())} value(s) that "
            f"are null, NaN, infinite or negative (first at row {first}: {float(values[first])}); "
            "behaviours must be finite and >= 0"
        )
    return values
