"""List columns: the last `max_len` elements of each list become rows of their table (shared
with a categorical column or their own), Parquet lists and CSV cells alike; empty and null lists
pool to zeros; mean, sum and target attention match a hand computation; the gradient reaches
the shared table; bad lists are named by file, column and row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from train.data.batch import SequenceInput
from train.data.features import DataError, FeatureSpec, sequence_matrix
from train.data.io import TableFormat, read_table
from train.model import DNN, FeatureEmbeddings

SPEC = FeatureSpec(
    categorical={"item": 11},
    dense=[],
    behaviours={"click": "click"},
    group_key="item",
    sequences={
        "history": {"table": "item", "max_len": 3, "pooling": "mean"},
        "tags": {"buckets": 7, "max_len": 2, "pooling": "sum"},
    },
)
ROWS = {
    "item": [5, 6, 7, 8],
    "history": [[1, 2, 3, 4], [], None, [9, None]],
    "tags": [["a"], ["b", "c", "d"], None, []],
    "click": [1, 0, 1, 0],
}


def hashed(ids: list, buckets: int) -> list[int]:
    from train.data.features import hash_ids

    return hash_ids(pa.array(ids), buckets).tolist()


def test_lists_keep_their_last_elements_padded_with_zeros() -> None:
    matrix = sequence_matrix(pa.table(ROWS), SPEC, "t")
    h = dict(zip([1, 2, 3, 4, 9], hashed([1, 2, 3, 4, 9], 11), strict=True))
    t = dict(zip("abcd", hashed(list("abcd"), 7), strict=True))
    assert matrix.tolist() == [
        [h[2], h[3], h[4], t["a"], 0],  # the last 3 of 4, in order
        [0, 0, 0, t["c"], t["d"]],  # empty history; the last 2 tags
        [0, 0, 0, 0, 0],  # null lists
        [h[9], 0, 0, 0, 0],  # a null element is padding
    ]
    assert [s.own_table for s in SPEC.sequence_inputs] == [False, True]
    assert SPEC.cardinalities == [11, 7] and list(SPEC.tables) == ["item", "tags"]


def test_csv_cells_read_as_the_parquet_lists(tmp_path: Path) -> None:
    table = pa.table(ROWS)
    pq.write_table(table, tmp_path / "rows.parquet")
    cells = {
        "history": ["1|2|3|4", "", None, "9"],  # a CSV cell cannot hold a null element
        "tags": ["a", "b|c|d", None, ""],
    }
    pacsv.write_csv(pa.table({**ROWS, **cells}), tmp_path / "rows.csv")
    layout = TableFormat(list_columns=("history", "tags"))
    read = {
        kind: read_table(str(tmp_path / f"rows.{kind}"), SPEC.columns, layout)
        for kind in ("parquet", "csv")
    }
    parquet = sequence_matrix(read["parquet"], SPEC, "p")
    csv = sequence_matrix(read["csv"], SPEC, "c")
    assert np.array_equal(parquet[:3], csv[:3]) and csv[3, 0] == parquet[3, 0]


def test_a_cell_that_is_not_a_list_of_ids_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    pacsv.write_csv(
        pa.table({**ROWS, "history": ["1|2", "3", "4;5", ""], "tags": ["", "", "", ""]}), path
    )
    table = read_table(str(path), SPEC.columns, TableFormat(list_columns=("history", "tags")))
    with pytest.raises(DataError, match=r"list column 'history' row 2: element '4;5' is not an"):
        sequence_matrix(table, SPEC, str(path))
    scalar = pa.table({**ROWS, "history": [1, 2, 3, 4]})
    with pytest.raises(DataError, match=r"t: list column 'history' .* has type int64"):
        sequence_matrix(scalar, SPEC, "t")


def embeddings(pooling: str) -> FeatureEmbeddings:
    torch.manual_seed(0)
    lists = [SequenceInput(table=0, max_len=3, pooling=pooling, candidate=0)]
    return FeatureEmbeddings([6], 4, sparse=True, sequences=lists)


CANDIDATES = torch.tensor([[1], [2], [3]])
LISTS = torch.tensor([[2, 3, 0], [4, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("pooling", ["mean", "sum", "attention"])
def test_pooling_matches_a_hand_computation(pooling: str) -> None:
    layer = embeddings(pooling)
    table = layer.table.weight.detach()
    fields = layer(CANDIDATES, LISTS).detach()
    assert torch.equal(fields[:, 0], table[CANDIDATES[:, 0]])
    expected = []
    for row in range(3):
        ids = [i for i in LISTS[row].tolist() if i]
        keys = table[ids]
        if not ids:
            expected.append(torch.zeros(4))
        elif pooling == "sum":
            expected.append(keys.sum(0))
        elif pooling == "mean":
            expected.append(keys.mean(0))
        else:
            query = table[CANDIDATES[row, 0]].expand_as(keys)
            mlp = layer.attention["0"]
            scores = mlp(torch.cat([keys, query, keys * query, keys - query], 1)).squeeze(1)
            expected.append((scores[:, None] * keys).sum(0))  # DIN: weights not normalised
    torch.testing.assert_close(fields[:, 1], torch.stack(expected).detach())


def test_the_gradient_reaches_the_shared_table() -> None:
    torch.manual_seed(0)
    lists = [SequenceInput(table=0, max_len=3, pooling="mean")]
    network = DNN([6], 0, embedding_dim=4, hidden=(8,), sequences=lists)
    network(CANDIDATES, torch.zeros(3, 0), LISTS).sum().backward()
    grad = network.embeddings.table.weight.grad.coalesce()
    rows = {r for r, g in zip(grad.indices()[0].tolist(), grad.values(), strict=True) if g.any()}
    # The candidates' rows and the history's (2, 3, 4), never the padding row 0.
    assert rows == {1, 2, 3, 4}


@pytest.mark.parametrize("sparse", [True, False])
def test_one_lookup_gives_the_gradients_of_separate_lookups(sparse: bool) -> None:
    """Ids, attention keys and pooled bags of one table go through one lookup (one sparse
    gradient): the fields and every table's gradient (DeepFM's first-order one too) are those
    of looking each up on its own with `nn.Embedding` and `embedding_bag`."""
    torch.manual_seed(0)
    lists = [
        SequenceInput(table=1, max_len=3, pooling="mean"),
        SequenceInput(table=1, max_len=3, pooling="attention", candidate=1),
        SequenceInput(table=2, max_len=3, pooling="sum", own_table=True),
    ]
    layer = FeatureEmbeddings([5, 6, 4], 4, sparse=sparse, sequences=lists, first_order=True)
    nn.init.normal_(layer.first_order.weight)
    ids = torch.tensor([[1, 2], [3, 5], [0, 1]])
    seqs = torch.cat([LISTS, LISTS.flip(0), torch.tensor([[1, 3, 0], [0, 0, 0], [2, 2, 0]])], 1)
    fields, scalars = layer.lookup(ids, seqs)
    (fields.square().sum() + scalars.square().sum()).backward()

    weight = layer.table.weight.detach().requires_grad_()
    first = layer.first_order.weight.detach().requires_grad_()
    rows = ids + layer.offsets[:2]
    expected, expected_scalars = [weight[rows]], [first[rows, 0]]
    for i, spec in enumerate(lists):
        local = seqs[:, 3 * i : 3 * i + 3]
        elements = local + layer.offsets[spec.table]
        present = (local > 0).float()
        if spec.pooling == "attention":
            keys, query = weight[elements], weight[rows[:, 1]].unsqueeze(1).expand(-1, 3, -1)
            mlp = layer.attention[str(i)]
            w = mlp(torch.cat([keys, query, keys * query, keys - query], -1)).squeeze(-1)
            w = w * present
        else:
            w = present / present.sum(1, keepdim=True).clamp(min=1) if i == 0 else present
        expected.append((w.unsqueeze(-1) * weight[elements]).sum(1))
        expected_scalars.append((w * first[elements, 0]).sum(1))
    expected_fields = torch.cat([expected[0], torch.stack(expected[1:], 1)], 1)
    expected_scalars = torch.cat([expected_scalars[0], torch.stack(expected_scalars[1:], 1)], 1)
    (expected_fields.square().sum() + expected_scalars.square().sum()).backward()
    torch.testing.assert_close(fields, expected_fields)
    torch.testing.assert_close(scalars, expected_scalars)
    for mine, theirs in ((layer.table.weight, weight), (layer.first_order.weight, first)):
        assert mine.grad.is_sparse == sparse
        torch.testing.assert_close(mine.grad.to_dense(), theirs.grad)


def feed_with_lists(folder: Path, fmt: str) -> Path:
    """Three splits with an id column, a history sharing its table, string tags and a click."""
    rng = np.random.default_rng(3)
    for split, rows in (("train", 1500), ("val", 400), ("test", 400)):
        items = rng.integers(0, 80, rows)
        history = [
            None if i % 17 == 0 else rng.integers(0, 90, rng.integers(0, 9)).tolist()
            for i in range(rows)
        ]
        tags = [[f"t{t}" for t in rng.integers(0, 12, rng.integers(0, 4))] for _ in range(rows)]
        table = pa.table(
            {"item": items, "history": history, "tags": tags, "click": rng.integers(0, 2, rows)}
        )
        (folder / split).mkdir(parents=True)
        path = folder / split / f"part.{fmt}"
        if fmt == "parquet":
            pq.write_table(table, path, row_group_size=128)
        else:
            cells = {
                c: ["|".join(map(str, v)) if v is not None else None for v in table[c].to_pylist()]
                for c in ("history", "tags")
            }
            pacsv.write_csv(
                table.drop_columns(["history", "tags"])
                .append_column("history", pa.array(cells["history"], pa.string()))
                .append_column("tags", pa.array(cells["tags"], pa.string())),
                path,
            )
    return folder


def rows_with_lists(batches) -> list[tuple]:
    out = []
    for b in batches:
        parts = [b.categorical, b.sequences, b.behaviours.long()]
        out += map(tuple, torch.cat(parts, 1).tolist())
    return sorted(out)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_stream_mode_equals_memory_mode(tmp_path: Path, fmt: str) -> None:
    from train.data.module import ImpressionDataModule
    from train.weights import build_scheme

    folder = feed_with_lists(tmp_path, fmt)
    modules = [
        ImpressionDataModule(
            categorical=["item"],
            dense=[],
            behaviours={"click": "click"},
            group_key="item",
            train=f"{folder}/train",
            val=f"{folder}/val",
            test=f"{folder}/test",
            sequences={
                "history": {"table": "item", "max_len": 5, "pooling": "attention"},
                "tags": {"max_len": 3, "pooling": "sum"},
            },
            batch_size=100,
            num_workers=0,
            mode=mode,
        )
        for mode in ("memory", "stream")
    ]
    stats = [m.prepare(build_scheme(label="click")) for m in modules]
    # The history's ids (0..89) join the item vocabulary (items 0..79) they share.
    assert stats[0] == stats[1] and stats[0].ids["item"]["distinct"] > 80
    memory, stream = modules
    assert memory.spec.vocabularies == stream.spec.vocabularies
    assert set(stream.spec.vocabularies) == {"item", "tags"}  # the history shares item's
    assert rows_with_lists(memory.train_dataloader()) == rows_with_lists(stream.train_dataloader())
    assert rows_with_lists(memory.val_dataloader()) == rows_with_lists(stream.val_dataloader())
