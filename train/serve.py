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

Raw ids are hashed exactly as in training (pandas' `hash_array`, re-implemented here): ints
(and integral floats, booleans) by their 64-bit value, strings by their UTF-8 bytes. Pass ids
with the type training read them with: the int 7 and the string "7" land in different buckets.
A missing key, None or NaN is a null: bucket 0 for ids; for dense features the `dense_fill` of
feature_spec.json (the training mean, or 0).
Columns that are not in the spec are ignored.
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

FORMAT = 1
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


def hash_ids(values: Sequence[Any] | np.ndarray, buckets: int, column: str = "ids") -> np.ndarray:
    """Raw ids -> bucket ids 1..buckets-1 (int64), nulls -> 0, as in training."""
    values = values if isinstance(values, np.ndarray) else _object_array(values)
    n = len(values)
    hashed = np.zeros(n, dtype=_U64)
    null = np.zeros(n, dtype=bool)
    if values.dtype.kind in "iub":
        hashed = splitmix64(values.astype(np.int64).view(_U64))
    elif values.dtype.kind == "f":
        null = np.isnan(values)
        filled = np.where(null, 0, values)
        if not np.array_equal(filled, np.trunc(filled)):
            raise ArtifactError(f"{column}: non-integral float ids; expected integers or strings")
        hashed = splitmix64(filled.astype(np.int64).view(_U64))
    else:
        ints: list[int] = []
        int_rows: list[int] = []
        strings: dict[str, list[int]] = {}
        for i, value in enumerate(values):
            kind = _id_kind(value, column, i)
            if kind is None:
                null[i] = True
            elif isinstance(kind, str):
                strings.setdefault(kind, []).append(i)
            else:
                ints.append(kind)
                int_rows.append(i)
        if ints:
            hashed[int_rows] = splitmix64(np.array(ints, dtype=np.int64).view(_U64))
        if strings:
            # Ids repeat a lot within a request: hash each distinct string once.
            unique = splitmix64(siphash24([s.encode("utf-8") for s in strings]))
            for h, rows in zip(unique, strings.values(), strict=True):
                hashed[rows] = h
    out = (hashed % _U64(buckets - 1)).astype(np.int64) + 1
    out[null] = 0
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


# -- the model ------------------------------------------------------------------------------


class Model:
    """An exported network and its feature spec: raw rows in, probabilities out."""

    def __init__(self, program: torch.nn.Module, spec: Mapping[str, Any]) -> None:
        self.program = program
        self.spec = dict(spec)
        self.categorical: list[tuple[str, int]] = [
            (c["name"], int(c["buckets"])) for c in spec["categorical"]
        ]
        self.dense: list[str] = [d["name"] for d in spec["dense"]]
        self.outputs: list[str] = list(spec["outputs"])

    @classmethod
    def load(cls, folder: str | Path) -> Model:
        folder = Path(folder)
        try:
            spec = json.loads((folder / SPEC).read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{folder / SPEC}: cannot read the feature spec ({err})") from err
        if spec.get("format") != FORMAT:
            raise ArtifactError(
                f"{folder / SPEC}: format {spec.get('format')!r}; this serve.py reads {FORMAT}"
            )
        return cls(load_program(folder / PROGRAM), spec)

    @property
    def columns(self) -> list[str]:
        """The raw columns a row may carry (categorical ids, then dense features)."""
        return [name for name, _ in self.categorical] + self.dense

    def features(self, columns: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw columns -> (bucket ids int64 [B, C], raw dense float32 [B, D])."""
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
        for j, (name, buckets) in enumerate(self.categorical):
            categorical[:, j] = hash_ids(columns[name], buckets, name)
        dense = np.zeros((rows, len(self.dense)), dtype=np.float32)
        for j, name in enumerate(self.dense):
            dense[:, j] = dense_column(columns[name], name)
        return torch.from_numpy(categorical), torch.from_numpy(dense)

    def score_columns(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Columns of raw values (lists or arrays, one per spec column) -> output columns."""
        categorical, dense = self.features(columns)
        if len(categorical) == 0:
            return {name: np.zeros(0, dtype=np.float32) for name in self.outputs}
        with torch.inference_mode():
            probs = self.program(categorical, dense).numpy()
        return {name: probs[:, k] for k, name in enumerate(self.outputs)}

    def score_rows(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Rows as dicts of raw values; a key missing from a row is a null."""
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
