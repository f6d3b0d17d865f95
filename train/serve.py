"""Score raw impressions with an exported upweight model. Needs only torch and numpy.

This file is copied into every artifact written by `python -m train.export`, next to
`model.pt2` (the network, dense standardisation inside) and `feature_spec.json` (columns,
hashing, training statistics, the weight scheme). From Python:

    from serve import Model
    model = Model.load("path/to/artifact")
    model.score_rows([{"user_id": "u42", "video_id": 7, "video_len_s": 31.0}, ...])
    # -> {"score": array([0.12, ...], dtype=float32)}  (+ "p_<head>" for multi-head models)

or as a filter, one JSON object per line in and out:

    python serve.py path/to/artifact < rows.jsonl > scores.jsonl

Raw ids map to embedding rows exactly as in training. A hashed column (`buckets` in
feature_spec.json) hashes them (pandas' `hash_array`, re-implemented here): ints (and integral
floats, booleans) by their 64-bit value, strings by their UTF-8 bytes, so pass ids with the type
training read them with: the int 7 and the string "7" land in different buckets. A vocabulary
column (`vocabulary`) looks them up: a training id -> its own row, any other id (rare in
training, or unseen) -> the out-of-vocabulary row; an int vocabulary refuses string ids and a
string vocabulary int ids, as training does.
A missing key, None or NaN is a null: the null row for ids; for dense features the `dense_fill`
of feature_spec.json (the training mean, or 0). A list column takes a JSON array of ids (a
missing key, None or [] is an empty list): its last `max_len` elements, in order, each mapped by
its table as above (a None element is a null); anything but a list is an error.
Columns that are not in the spec are ignored.

Longer than 450 lines because it is copied alone into every artifact: the hashing, the
vocabulary and list encodings and the safe loader cannot live in other modules.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import pickle
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 2
READS = (1, 2)
"""Feature spec formats this serve.py reads: 1 (hashed ids only), 2 (vocabularies, list
columns)."""
PROGRAM = "model.pt2"
SPEC = "feature_spec.json"

# pandas' default hash key (pandas.core.util.hashing._default_hash_key).
HASH_KEY = b"0123456789123456"
_U64 = np.uint64


class ArtifactError(ValueError):
    """An artifact that cannot be loaded safely, or inputs that do not fit its spec."""


# -- hashing: pandas.util.hash_array(values, categorize=True), without pandas -------------------


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The finaliser pandas applies to every 64-bit hash (uint64 in, uint64 out)."""
    x = values.astype(_U64, copy=True)
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def _rotl(x: np.ndarray, bits: int) -> np.ndarray:
    return (x << _U64(bits)) | (x >> _U64(64 - bits))


def _sipround(v0, v1, v2, v3):  # four uint64 arrays in, four out
    v0 = v0 + v1
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = v2 + v3
    v3 = _rotl(v3, 16) ^ v2
    v0 = v0 + v3
    v3 = _rotl(v3, 21) ^ v0
    v2 = v2 + v1
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash24(messages: Sequence[bytes], key: bytes = HASH_KEY) -> np.ndarray:
    """SipHash-2-4 of each message (the reference algorithm), vectorised over messages."""
    n = len(messages)
    if n == 0:
        return np.zeros(0, dtype=_U64)
    k0, k1 = (_U64(int.from_bytes(key[i : i + 8], "little")) for i in (0, 8))
    lengths = np.fromiter(map(len, messages), dtype=np.int64, count=n)
    blocks = lengths // 8 + 1  # the last block holds the tail bytes and the length byte
    width = int(blocks.max())
    data = np.zeros((n, width * 8), dtype=np.uint8)
    flat = np.frombuffer(b"".join(messages), dtype=np.uint8)
    rows = np.repeat(np.arange(n), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    data[rows, np.arange(flat.size) - starts] = flat
    data[np.arange(n), blocks * 8 - 1] = (lengths & 0xFF).astype(np.uint8)
    words = data.view("<u8").astype(_U64)
    v0 = np.full(n, k0 ^ _U64(0x736F6D6570736575), dtype=_U64)
    v1 = np.full(n, k1 ^ _U64(0x646F72616E646F6D), dtype=_U64)
    v2 = np.full(n, k0 ^ _U64(0x6C7967656E657261), dtype=_U64)
    v3 = np.full(n, k1 ^ _U64(0x7465646279746573), dtype=_U64)
    for j in range(width):
        m = words[:, j]
        n0, n1, n2, n3 = _sipround(*_sipround(v0, v1, v2, v3 ^ m))
        # Messages shorter than the longest have finished: their state stays as it was.
        live = j < blocks
        v0, v1, v2, v3 = (
            np.where(live, new, old) for new, old in ((n0 ^ m, v0), (n1, v1), (n2, v2), (n3, v3))
        )
    v2 = v2 ^ _U64(0xFF)
    for _ in range(2):
        v0, v1, v2, v3 = _sipround(*_sipround(v0, v1, v2, v3))
    return v0 ^ v1 ^ v2 ^ v3


class Ids:
    """Raw ids as training compares them: ints (booleans, integral floats) by their int64
    value, strings, and nulls (None, NaN); positions index the values as given."""

    def __init__(
        self,
        null: np.ndarray,
        int_rows: np.ndarray,
        ints: np.ndarray,
        str_rows: np.ndarray,
        strings: list[str],
        inverse: np.ndarray,
    ) -> None:
        self.null = null
        """bool [n]: None or NaN."""
        self.int_rows, self.ints = int_rows, ints
        """Positions of the int ids and their int64 values."""
        self.str_rows, self.strings, self.inverse = str_rows, strings, inverse
        """Positions of the string ids; the distinct strings; each position's one of them."""

    def __len__(self) -> int:
        return len(self.null)


_NO_ROWS = np.zeros(0, dtype=np.int64)
_INT_TYPES = {int, bool, type(None)}
_STR_TYPES = {str, type(None)}


def parse_ids(
    values: Sequence[Any] | np.ndarray, column: str = "ids", rows: np.ndarray | None = None
) -> Ids:
    """Raw ids -> `Ids`. Numeric arrays, and lists of only ints or only strings (with nulls),
    take no Python step per value; a list mixing types is checked value by value."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iubf":
        return _numeric_ids(values, column, rows)
    items = values.tolist() if isinstance(values, np.ndarray) else list(values)
    kinds = set(map(type, items))
    if not (kinds <= _INT_TYPES or kinds <= _STR_TYPES):
        return _checked_ids(items, column, rows)
    array = _object_array(items)
    null = np.equal(array, None).astype(bool)
    present = np.flatnonzero(~null)
    if kinds <= _INT_TYPES:
        try:
            ints = array[present].astype(np.int64)
        except OverflowError:
            return _checked_ids(items, column, rows)  # names the id beyond int64
        return Ids(null, present, ints, _NO_ROWS, [], _NO_ROWS)
    strings = array[present].tolist()
    distinct = {v: i for i, v in enumerate(dict.fromkeys(strings))}
    inverse = np.fromiter(map(distinct.__getitem__, strings), np.int64, len(strings))
    return Ids(null, _NO_ROWS, _NO_ROWS, present, list(distinct), inverse)


def _numeric_ids(values: np.ndarray, column: str, rows: np.ndarray | None) -> Ids:
    null = np.zeros(len(values), dtype=bool)
    if values.dtype.kind == "f":
        null = np.isnan(values)
        filled = np.where(null, 0, values)
        bad = ~np.isfinite(filled) | (filled != np.trunc(filled))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ArtifactError(
                f"{column} row {_row(rows, first)}: non-integral float id {float(filled[first])!r}"
                "; expected integers or strings"
            )
        values = filled
    present = np.flatnonzero(~null)
    # uint64 ids beyond 2**63 keep their bits as int64, as training reads them.
    ints = values[present].astype(np.int64)
    return Ids(null, present, ints, _NO_ROWS, [], _NO_ROWS)


def _checked_ids(items: Sequence[Any], column: str, rows: np.ndarray | None) -> Ids:
    null = np.zeros(len(items), dtype=bool)
    ints: list[int] = []
    int_rows: list[int] = []
    strings: dict[str, list[int]] = {}
    for i, value in enumerate(items):
        kind = _id_kind(value, column, _row(rows, i))
        if kind is None:
            null[i] = True
        elif isinstance(kind, str):
            strings.setdefault(kind, []).append(i)
        else:
            ints.append(kind)
            int_rows.append(i)
    str_rows = np.array([i for positions in strings.values() for i in positions], np.int64)
    inverse = np.repeat(np.arange(len(strings)), [len(p) for p in strings.values()])
    return Ids(
        null,
        np.array(int_rows, dtype=np.int64),
        np.array(ints, dtype=np.int64),
        str_rows,
        list(strings),
        inverse.astype(np.int64),
    )


def _row(rows: np.ndarray | None, i: int) -> int:
    return i if rows is None else int(rows[i])


def hash_ids(
    values: Sequence[Any] | np.ndarray,
    buckets: int,
    column: str = "ids",
    rows: np.ndarray | None = None,
    null_bucket: int = 0,
) -> np.ndarray:
    """Raw ids -> bucket ids 1..buckets-1 (int64), nulls -> `null_bucket`, as in training."""
    ids = parse_ids(values, column, rows)
    hashed = np.zeros(len(ids), dtype=_U64)
    hashed[ids.int_rows] = splitmix64(ids.ints.view(_U64))
    if ids.strings:
        # Ids repeat a lot within a request: each distinct string is hashed once.
        unique = splitmix64(siphash24([s.encode("utf-8") for s in ids.strings]))
        hashed[ids.str_rows] = unique[ids.inverse]
    out = (hashed % _U64(buckets - 1)).astype(np.int64) + 1
    out[ids.null] = null_bucket
    return out


def _id_kind(value: Any, column: str, row: int) -> int | str | None:
    """A raw id as pandas hashes it: the int64 value, the string, or None for a null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_ | int | np.integer):
        number = int(value)
        if not -(2**63) <= number < 2**63:
            raise ArtifactError(f"{column} row {row}: id {number} does not fit in int64")
        return number
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        if not float(value).is_integer():
            raise ArtifactError(f"{column} row {row}: non-integral float id {value!r}")
        return int(value)
    raise ArtifactError(
        f"{column} row {row}: id of type {type(value).__name__}; expected int, str or None"
    )


def _object_array(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def dense_column(values: Sequence[Any] | np.ndarray, column: str = "dense") -> np.ndarray:
    """Raw numbers -> float32, None/NaN kept as NaN (the program fills them with the mean)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iubf":
        return values.astype(np.float32)
    out = np.empty(len(values), dtype=np.float32)
    for i, value in enumerate(values):
        if value is None:
            out[i] = np.nan
        elif isinstance(value, bool | int | float | np.number):
            out[i] = value
        else:
            raise ArtifactError(
                f"{column} row {i}: value of type {type(value).__name__}; expected a number"
            )
    return out


# -- loading the program without running code from the file --------------------------------

# Operators a ranking network's graph may call besides aten/prims ops; anything else in a
# program (a Python function reachable from `torch.`) would be arbitrary code.
_GRAPH_HELPERS = {
    operator.getitem,
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.truediv,
    operator.mod,
    operator.neg,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
}
_OP_NAMESPACES = {"aten", "prims"}
_FILE_OPS = {"from_file", "save", "load"}  # aten ops that open files by name


@contextlib.contextmanager
def _no_unpickling() -> Iterator[None]:
    """While torch.export.load runs: every torch.load is weights_only and plain pickle is off.

    torch.export.load falls back to full unpickling for some payloads (pickled weights and
    constants, sample inputs that fail the weights_only load); an artifact written by
    `train.export` never needs it, and a crafted one must not get it.
    """
    real_load, real_loads = torch.load, pickle.loads

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def loads(*args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("a pickled Python object")

    torch.load, pickle.loads = load, loads
    try:
        yield
    finally:
        torch.load, pickle.loads = real_load, real_loads


def load_program(path: str | Path) -> torch.nn.Module:
    """Load `model.pt2` without unpickling Python objects, and refuse a graph that calls
    anything but torch operators."""
    try:
        with _no_unpickling():
            program = torch.export.load(str(path))
    except pickle.UnpicklingError as err:
        raise ArtifactError(
            f"{path}: refused to load: it holds a Python object that only unpickling (running "
            f"code from the file) could rebuild ({_first_line(err)}); an artifact written by "
            "`python -m train.export` holds only tensors and a graph"
        ) from err
    except Exception as err:
        raise ArtifactError(
            f"{path}: not a loadable torch.export program ({type(err).__name__}: "
            f"{_first_line(err)})"
        ) from err
    for node in program.graph.nodes:
        if node.op == "call_function" and not _allowed(node.target):
            raise ArtifactError(
                f"{path}: refused: the program calls {node.target!r} (node {node.name}), which "
                "is not a torch operator"
            )
    return program.module()


def _allowed(target: Any) -> bool:
    if target in _GRAPH_HELPERS:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in _OP_NAMESPACES and target._opname not in _FILE_OPS
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -- encodings: raw ids -> rows of an embedding table, as in training -----------------------


class Buckets:
    """A hashed table: `hash_ids` into 1..buckets-1, nulls to `null_bucket`."""

    def __init__(self, buckets: int, null_bucket: int) -> None:
        self.buckets = buckets
        self.null = null_bucket

    def encode(
        self, values: Sequence[Any] | np.ndarray, column: str, rows: np.ndarray | None = None
    ) -> np.ndarray:
        return hash_ids(values, self.buckets, column, rows, self.null)


class Vocabulary:
    """An exact vocabulary: an id listed in `ids` -> `first_index` + its position; any other id
    (rare in training, or unseen) -> `oov_index`; None/NaN -> `null_index`. Ints and strings
    are looked up as what they are: an int vocabulary refuses string ids and vice versa, as
    training does."""

    def __init__(self, entry: Mapping[str, Any], where: str) -> None:
        self.kind = _field(entry, "kind", where, str)
        if self.kind not in ("int", "string"):
            raise ArtifactError(f"{where}.kind={self.kind!r}: expected 'int' or 'string'")
        ids = _field(entry, "ids", where, list)
        self.null = _field(entry, "null_index", where, int)
        self.oov = _field(entry, "oov_index", where, int)
        first = _field(entry, "first_index", where, int)
        if self.kind == "int":
            if not all(type(v) is int and -(2**63) <= v < 2**63 for v in ids):
                raise ArtifactError(f"{where}.ids: expected int64 integers (kind 'int')")
            values = np.array(ids, dtype=np.int64)
            # A sorted copy and each id's index: a lookup is one searchsorted per request.
            order = np.argsort(values, kind="stable")
            self.sorted = values[order]
            self.indices = order.astype(np.int64) + first
        else:
            if not all(isinstance(v, str) for v in ids):
                raise ArtifactError(f"{where}.ids: expected strings (kind 'string')")
            self.lookup = {v: i + first for i, v in enumerate(ids)}

    def encode(
        self, values: Sequence[Any] | np.ndarray, column: str, rows: np.ndarray | None = None
    ) -> np.ndarray:
        ids = parse_ids(values, column, rows)
        out = np.full(len(ids), self.oov, dtype=np.int64)
        if self.kind == "int":
            if ids.strings:
                row = _row(rows, int(ids.str_rows[0]))
                raise ArtifactError(
                    f"{column} row {row}: string id {ids.strings[ids.inverse[0]]!r}; the "
                    "vocabulary holds int ids (send them as numbers, as training read them)"
                )
            if len(self.sorted) and len(ids.ints):
                at = np.searchsorted(self.sorted, ids.ints)
                found = at < len(self.sorted)
                found[found] = self.sorted[at[found]] == ids.ints[found]
                out[ids.int_rows[found]] = self.indices[at[found]]
        else:
            if len(ids.int_rows):
                row = _row(rows, int(ids.int_rows[0]))
                raise ArtifactError(
                    f"{column} row {row}: int id {int(ids.ints[0])}; the vocabulary holds "
                    "string ids (send them as strings, as training read them)"
                )
            if ids.strings:
                # One dict lookup per distinct string.
                codes = [self.lookup.get(s, self.oov) for s in ids.strings]
                out[ids.str_rows] = np.array(codes, dtype=np.int64)[ids.inverse]
        out[ids.null] = self.null
        return out


Encoding = Buckets | Vocabulary


def encoding(entry: Mapping[str, Any], spec: Mapping[str, Any], where: str) -> Encoding:
    """The encoding a spec entry gives its table: `buckets` or `vocabulary`."""
    if "vocabulary" in entry:
        if "buckets" in entry:
            raise ArtifactError(f"{where}: both buckets and vocabulary; expected one")
        vocabulary = _field(entry, "vocabulary", where, Mapping)
        return Vocabulary(vocabulary, f"{where}.vocabulary")
    buckets = _field(entry, "buckets", where, int)
    if buckets < 2:
        raise ArtifactError(f"{where}.buckets={buckets}: expected an integer >= 2")
    return Buckets(buckets, int(spec.get("null_bucket", 0)))


def _field(entry: Mapping[str, Any], key: str, where: str, kind: Any) -> Any:
    if not isinstance(entry, Mapping) or key not in entry:
        raise ArtifactError(f"{where}: no {key!r}; the feature spec is incomplete")
    value = entry[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ArtifactError(f"{where}.{key}={value!r}: expected {getattr(kind, '__name__', kind)}")
    return value


class ListColumn:
    """A list column: its last `max_len` elements, in list order, each encoded by its table;
    padded at the end with the table's null row (which the network leaves out of pooling)."""

    def __init__(self, name: str, max_len: int, table: str, encoding: Encoding) -> None:
        self.name = name
        self.max_len = max_len
        self.table = table
        self.encoding = encoding

    def encode(self, values: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Raw lists (None, NaN or [] for none) -> table rows [len(values), max_len] int64."""
        tails: list[Any] = []
        lengths = np.zeros(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            array = isinstance(value, np.ndarray)
            if not (isinstance(value, list | tuple) or (array and value.ndim == 1)):
                shown = repr(value)
                raise ArtifactError(
                    f"list column {self.name!r} row {i}: {type(value).__name__} "
                    f"{shown if len(shown) <= 40 else shown[:37] + '...'}; expected a list of "
                    "ids (a JSON array), or null"
                )
            tail = value[-self.max_len :]
            tails.extend(tail.tolist() if array else tail)
            lengths[i] = len(tail)
        rows = np.repeat(np.arange(len(values), dtype=np.int64), lengths)
        codes = self.encoding.encode(tails, f"list column {self.name!r}", rows)
        position = np.arange(len(rows)) - (np.cumsum(lengths) - lengths)[rows]
        out = np.full((len(values), self.max_len), self.encoding.null, dtype=np.int64)
        out[rows, position] = codes
        return out


# -- the model ------------------------------------------------------------------------------


class Model:
    """An exported network and its feature spec: raw rows in, probabilities out."""

    def __init__(self, program: torch.nn.Module, spec: Mapping[str, Any]) -> None:
        self.program = program
        self.spec = dict(spec)
        self.tables: dict[str, Encoding] = {}
        """Embedding table -> its encoding: one per categorical column, then one per list column
        with a table of its own."""
        for i, entry in enumerate(_field(spec, "categorical", SPEC, list)):
            name = _field(entry, "name", f"{SPEC}: categorical[{i}]", str)
            self.tables[name] = encoding(entry, spec, f"{SPEC}: categorical {name!r}")
        self.categorical: list[str] = list(self.tables)
        self.sequences: list[ListColumn] = []
        for i, entry in enumerate(spec.get("sequences") or []):
            name = _field(entry, "name", f"{SPEC}: sequences[{i}]", str)
            where = f"{SPEC}: sequences {name!r}"
            table = _field(entry, "table", where, str)
            max_len = _field(entry, "max_len", where, int)
            if max_len < 1:
                raise ArtifactError(f"{where}.max_len={max_len}: expected an integer >= 1")
            if table == name:
                self.tables[name] = encoding(entry, spec, where)
            elif table not in self.categorical:
                raise ArtifactError(
                    f"{where}.table={table!r}: expected a categorical column {self.categorical} "
                    f"or {name!r} itself (a table of its own)"
                )
            self.sequences.append(ListColumn(name, max_len, table, self.tables[table]))
        self.dense: list[str] = [
            _field(d, "name", f"{SPEC}: dense[{i}]", str)
            for i, d in enumerate(_field(spec, "dense", SPEC, list))
        ]
        self.outputs: list[str] = list(_field(spec, "outputs", SPEC, list))

    @classmethod
    def load(cls, folder: str | Path) -> Model:
        folder = Path(folder)
        try:
            spec = json.loads((folder / SPEC).read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{folder / SPEC}: cannot read the feature spec ({err})") from err
        if not isinstance(spec, dict) or spec.get("format") not in READS:
            found = spec.get("format") if isinstance(spec, dict) else spec
            raise ArtifactError(
                f"{folder / SPEC}: format {found!r}; this serve.py reads "
                f"{' or '.join(map(str, READS))}"
            )
        return cls(load_program(folder / PROGRAM), spec)

    @property
    def columns(self) -> list[str]:
        """The raw columns a row may carry (categorical ids, list columns, dense features)."""
        return [*self.categorical, *(s.name for s in self.sequences), *self.dense]

    def features(self, columns: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """Raw columns -> what the program takes: (table rows int64 [B, C], raw dense float32
        [B, D]), and the list columns' table rows int64 [B, Σ max_len] when the model has any."""
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise ArtifactError(f"missing column(s) {missing}; the model reads {self.columns}")
        rows = len(columns[self.columns[0]]) if self.columns else 0
        for name in self.columns:
            if len(columns[name]) != rows:
                raise ArtifactError(
                    f"column {name!r} has {len(columns[name])} values; "
                    f"{self.columns[0]!r} has {rows}"
                )
        categorical = np.zeros((rows, len(self.categorical)), dtype=np.int64)
        for j, name in enumerate(self.categorical):
            categorical[:, j] = self.tables[name].encode(columns[name], name)
        dense = np.zeros((rows, len(self.dense)), dtype=np.float32)
        for j, name in enumerate(self.dense):
            dense[:, j] = dense_column(columns[name], name)
        inputs = [torch.from_numpy(categorical), torch.from_numpy(dense)]
        if self.sequences:
            lists = [s.encode(columns[s.name]) for s in self.sequences]
            inputs.append(torch.from_numpy(np.concatenate(lists, axis=1)))
        return tuple(inputs)

    def score_columns(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Columns of raw values (lists or arrays, one per spec column) -> output columns."""
        inputs = self.features(columns)
        if len(inputs[0]) == 0:
            return {name: np.zeros(0, dtype=np.float32) for name in self.outputs}
        with torch.inference_mode():
            probs = self.program(*inputs).numpy()
        return {name: probs[:, k] for k, name in enumerate(self.outputs)}

    def score_rows(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Rows as dicts of raw values; a key missing from a row is a null (an empty list for
        a list column)."""
        absent = [c for c in self.columns if rows and not any(c in row for row in rows)]
        if absent:
            # In no row at all: a misspelt or forgotten column, not a null.
            raise ArtifactError(f"no row has column(s) {absent}; the model reads {self.columns}")
        columns = {c: [row.get(c) for row in rows] for c in self.columns}
        return self.score_columns(columns)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python serve.py ARTIFACT_DIR < rows.jsonl > scores.jsonl", file=sys.stderr)
        return 2
    try:
        model = Model.load(args[0])
        rows = [json.loads(line) for line in sys.stdin if line.strip()]
        scores = model.score_rows(rows)
    except ArtifactError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for i in range(len(rows)):
        print(json.dumps({name: float(values[i]) for name, values in scores.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
