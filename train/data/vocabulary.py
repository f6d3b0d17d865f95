"""Exact vocabularies of id columns, learned in the statistics pass and kept with the run.

A column given as `data.categorical: [video_id]` (or `{video_id: vocab}`) maps each training id
to its own embedding row instead of a hash bucket, so no two ids share a row:

- index 0: null (and, in list columns, padding: left out of the pooling);
- index 1: out of vocabulary: ids seen fewer than `data.min_count` times in the training split,
  and ids never seen there. One shared row, so the rare ids train it and a new id at prediction
  time scores like a rare one, not like an untrained row;
- indices 2..: the vocabulary, most frequent first (ties by id), so the order depends on the
  training rows alone, not on how they were read.

Counting is streaming and mergeable (`IdCounter`): each chunk's distinct ids with their counts,
folded into one table by Arrow's hash aggregation whenever the pending parts outgrow it, so
memory follows the number of distinct ids, not the number of rows.

Hashed columns are counted too (by their 64-bit hash): `collision_rate` is the share of
distinct training ids that share a bucket with another id.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

NULL_INDEX = 0
OOV_INDEX = 1
RESERVED = 2
"""Indices before the vocabulary: null, out of vocabulary."""
VOCAB = "vocab"
"""The value that asks for a vocabulary where a bucket count could stand (`{video_id: vocab}`)."""
COLLISION_WARNING = 0.10
"""A hashed column whose distinct training ids share buckets more than this is worth a warning."""
_COMPACT_ROWS = 1 << 20


def id_kind_of(kind: pa.DataType) -> str | None:
    """`int` or `string` (how ids of this Arrow type are compared), None when it holds no ids."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if (
        pa.types.is_integer(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_null(kind)
    ):
        return "int"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    return None


def canonical_ids(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Raw ids as compared by a vocabulary: int64 (ints, booleans, integral floats) or strings;
    null (and NaN among floats) as null. Raises TypeError for other values."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = kind.value_type
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind):
        return column.cast(pa.int64(), safe=False)
    if pa.types.is_floating(kind):
        column = pc.if_else(pc.is_nan(column).fill_null(False), pa.scalar(None, kind), column)
        present = column.drop_null()
        if not pc.all(pc.is_finite(present)).as_py() and len(present):
            raise TypeError("infinite float ids")
        as_int = column.cast(pa.int64(), safe=False)
        if len(present) and not pc.all(pc.equal(as_int.cast(kind), column)).as_py():
            raise TypeError("non-integral float ids")
        return as_int
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column.cast(pa.string())
    raise TypeError(f"ids of type {kind}")


class IdCounter:
    """How often each distinct id occurs in the rows added so far; mergeable in any order."""

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []
        self.pending = 0
        self.size = 0

    def add(self, ids: pa.Array) -> None:
        """Count canonical ids (`canonical_ids`, or int64 hashes); nulls are not counted."""
        counts = pc.value_counts(ids.drop_null())
        part = pa.table({"id": counts.field("values"), "n": counts.field("counts")})
        self._add_parts([part], len(part))

    def merge(self, other: IdCounter) -> None:
        self._add_parts(other.parts, other.pending + other.size)

    def _add_parts(self, parts: list[pa.Table], rows: int) -> None:
        kinds = {p.schema.field("id").type for p in [*self.parts, *parts] if len(p)}
        if len(kinds) > 1:
            raise TypeError(f"ids of several types {sorted(map(str, kinds))}")
        self.parts += parts
        self.pending += rows
        if self.pending > max(_COMPACT_ROWS, self.size):
            self.table()

    def table(self) -> pa.Table:
        """(id, n): every distinct id once, with its count."""
        parts = [p for p in self.parts if len(p)]
        if not parts:
            return pa.table({"id": pa.array([], pa.int64()), "n": pa.array([], pa.int64())})
        if len(parts) > 1:
            merged = pa.concat_tables(parts).group_by("id").aggregate([("n", "sum")])
            parts = [merged.rename_columns(["id", "n"]).select(["id", "n"])]
        self.parts, self.size, self.pending = parts, len(parts[0]), 0
        return parts[0]


class Vocabulary:
    """One column's (or table's) training ids -> embedding rows; see the module docstring."""

    def __init__(self, values: np.ndarray, kind: str, min_count: int, distinct: int) -> None:
        self.values = values
        """The ids in index order (index = position + RESERVED): int64, or object strings."""
        self.kind = kind
        self.min_count = min_count
        self.distinct = distinct
        """Distinct ids in the training split, the rare ones included."""

    @staticmethod
    def build(counter: IdCounter, min_count: int) -> Vocabulary:
        counts = counter.table()
        kind = "string" if pa.types.is_string(counts.schema.field("id").type) else "int"
        kept = counts.filter(pc.greater_equal(counts.column("n"), min_count))
        kept = kept.sort_by([("n", "descending"), ("id", "ascending")])
        values = kept.column("id").to_numpy()
        if kind == "string":
            values = values.astype(object)
        return Vocabulary(values, kind, min_count, len(counts))

    @property
    def size(self) -> int:
        """Embedding rows: the reserved ones and one per id."""
        return len(self.values) + RESERVED

    @cached_property
    def _index(self) -> pd.Index:
        return pd.Index(self.values)

    def encode(self, ids: pa.Array) -> np.ndarray:
        """Canonical ids (`canonical_ids`) -> int64 indices: 0 null, 1 out of vocabulary."""
        kind = id_kind_of(ids.type)
        if kind != self.kind and not pa.types.is_null(ids.type) and len(ids):
            raise TypeError(f"{kind} ids, but the vocabulary (from training) holds {self.kind} ids")
        nulls = ids.is_null().to_numpy(zero_copy_only=False)
        filler = "" if self.kind == "string" else 0
        values = ids.cast(pa.string() if self.kind == "string" else pa.int64()).fill_null(filler)
        raw = values.to_numpy(zero_copy_only=False)
        position = self._index.get_indexer(raw) if len(self.values) else np.full(len(raw), -1)
        out = np.where(position >= 0, position + RESERVED, OOV_INDEX).astype(np.int64)
        out[nulls] = NULL_INDEX
        return out

    def state(self) -> dict[str, Any]:
        """Plain values for a checkpoint (loadable with weights_only): ints as one tensor."""
        values: Any = (
            torch.from_numpy(self.values.astype(np.int64))
            if self.kind == "int"
            else [str(v) for v in self.values]
        )
        return {
            "kind": self.kind,
            "min_count": self.min_count,
            "distinct": self.distinct,
            "values": values,
        }

    @staticmethod
    def from_state(state: Mapping[str, Any]) -> Vocabulary:
        kind = state["kind"]
        raw = state["values"]
        if kind == "int":
            values = np.asarray(raw.numpy() if isinstance(raw, torch.Tensor) else raw, np.int64)
        else:
            values = np.asarray(list(raw), dtype=object)
        return Vocabulary(values, kind, int(state["min_count"]), int(state["distinct"]))

    def summary(self) -> dict[str, Any]:
        """What stats.json says of it: sizes, not ids."""
        return {
            "encoding": "vocabulary",
            "distinct": self.distinct,
            "rows": self.size,
            "rare": self.distinct - len(self.values),
            "min_count": self.min_count,
        }

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocabulary)
            and self.kind == other.kind
            and self.min_count == other.min_count
            and np.array_equal(self.values, other.values)
        )

    def __getstate__(self) -> dict[str, Any]:
        # Workers rebuild the lookup index instead of receiving it pickled.
        return {k: v for k, v in self.__dict__.items() if k != "_index"}


def collision_rate(hashes: np.ndarray, buckets: int) -> float:
    """Share of distinct ids (their 64-bit hashes) whose bucket holds another id too."""
    if len(hashes) == 0:
        return 0.0
    bucket = hashes.view(np.uint64) % np.uint64(buckets - 1)
    _, inverse, counts = np.unique(bucket, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).mean())
