"""Exact vocabularies: the id pass counts training ids (mergeable, in any order), null, rare and
unseen ids land on their reserved rows, every form of `data.categorical` builds the right
tables, hashed columns report their collisions, and a vocabulary survives the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from train.data.config import parse_categorical
from train.data.features import DataConfigError, DataError, FeatureSpec, model_inputs
from train.data.module import ImpressionDataModule
from train.data.vocabulary import (
    NULL_INDEX,
    OOV_INDEX,
    RESERVED,
    IdCounter,
    Vocabulary,
    canonical_ids,
    collision_rate,
)
from train.weights import build_scheme


def vocabulary(*chunks: list, min_count: int = 1) -> Vocabulary:
    counter = IdCounter()
    for chunk in chunks:
        counter.add(canonical_ids(pa.array(chunk)))
    return Vocabulary.build(counter, min_count)


def test_null_rare_and_unseen_ids_map_to_their_reserved_rows() -> None:
    vocab = vocabulary([7, 7, 7, 3, 3, 9, None], min_count=2)
    assert list(vocab.values) == [7, 3]  # most frequent first; 9 is rare
    assert vocab.size == RESERVED + 2 and vocab.distinct == 3
    codes = vocab.encode(canonical_ids(pa.array([7, 3, 9, 12345, None])))
    assert codes.tolist() == [RESERVED, RESERVED + 1, OOV_INDEX, OOV_INDEX, NULL_INDEX]


def test_string_ids_and_integral_floats() -> None:
    words = vocabulary(["b", "a", "b", None])
    assert list(words.values) == ["b", "a"]
    assert words.encode(canonical_ids(pa.array(["a", "zz", None]))).tolist() == [3, 1, 0]
    # Ids read from CSV with gaps arrive as floats: the same ids as the ints.
    ints = vocabulary([5, 6, 6])
    floats = canonical_ids(pa.array([6.0, 5.0, float("nan"), None]))
    assert ints.encode(floats).tolist() == [2, 3, 0, 0]
    with pytest.raises(TypeError, match="non-integral"):
        canonical_ids(pa.array([1.5]))
    with pytest.raises(TypeError, match="string ids, but the vocabulary"):
        ints.encode(canonical_ids(pa.array(["6"])))


def test_counting_is_order_free_and_merges() -> None:
    rng = np.random.default_rng(0)
    ids = rng.zipf(1.5, 20_000) % 5000
    one = vocabulary(ids.tolist())
    parts = [IdCounter() for _ in range(4)]
    for i, chunk in enumerate(np.array_split(ids[::-1], 13)):
        parts[i % 4].add(canonical_ids(pa.array(chunk)))
    merged = parts[3]
    for part in parts[:3]:
        merged.merge(part)
    assert Vocabulary.build(merged, 1) == one
    counts = np.bincount(ids)
    # Index order: count descending, ties by id.
    expected = sorted(np.flatnonzero(counts), key=lambda v: (-counts[v], v))
    assert list(one.values) == expected


def test_state_round_trip_and_dictionary_columns() -> None:
    vocab = vocabulary(["x", "y", "y"])
    assert Vocabulary.from_state(vocab.state()) == vocab
    ints = vocabulary([1, 2, 2])
    state = ints.state()
    assert isinstance(state["values"], torch.Tensor)  # weights_only-loadable
    assert Vocabulary.from_state(state) == ints
    encoded = pa.array(["y", "x", None]).dictionary_encode()
    assert vocab.encode(canonical_ids(encoded)).tolist() == [2, 3, 0]


def test_collision_rate_counts_ids_sharing_a_bucket() -> None:
    hashes = np.array([0, 1, 2, 3, 4], dtype=np.int64)  # buckets of 1 + h % 4: 0,1,2,3,0
    assert collision_rate(hashes, 5) == pytest.approx(2 / 5)
    assert collision_rate(hashes, 100) == 0.0


def test_categorical_forms() -> None:
    assert parse_categorical(["a", "b"]) == {"a": "vocab", "b": "vocab"}
    assert parse_categorical({"a": 10, "b": "vocab"}) == {"a": 10, "b": "vocab"}
    assert parse_categorical(["a", {"b": 10}]) == {"a": "vocab", "b": 10}
    with pytest.raises(DataConfigError, match="names column 'a' twice"):
        parse_categorical(["a", {"a": 10}])
    with pytest.raises(DataConfigError, match=r"data\.categorical='a'"):
        parse_categorical("a")
    with pytest.raises(DataConfigError, match=r"data\.categorical\.b=1: expected an integer >= 2"):
        FeatureSpec(categorical={"b": 1}, dense=[], behaviours={"c": "c"}, group_key="g")


def write(path: Path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_data_module_builds_vocabularies_and_reports_collisions(tmp_path, caplog) -> None:
    rng = np.random.default_rng(1)
    n = 4000
    users = rng.integers(0, 300, n)
    train = write(
        tmp_path / "train.parquet",
        user=users,
        item=[f"i{v}" for v in rng.integers(0, 50, n)],
        click=rng.integers(0, 2, n),
    )
    test = write(
        tmp_path / "test.parquet",
        user=pa.array([int(users[0]), 10**9, None]),
        item=["i1", "never", None],
        click=[1, 0, 1],
    )
    data = ImpressionDataModule(
        categorical=["item", {"user": 64}],
        dense=[],
        behaviours={"click": "click"},
        group_key="user",
        train=train,
        val=test,
        test=test,
        mode="memory",
        min_count=3,
    )
    with caplog.at_level(logging.WARNING):
        stats = data.prepare(build_scheme(label="click"))
    assert "table 'user'" in caplog.text and "share a hash bucket" in caplog.text
    assert stats.ids["user"]["encoding"] == "hash" and stats.ids["user"]["collision_rate"] > 0.5
    assert stats.ids["item"] == {
        "encoding": "vocabulary",
        "distinct": 50,
        "rows": 52,
        "rare": 0,
        "min_count": 3,
    }
    assert data.spec.cardinalities == [52, 64]
    codes = data.tables["test"].categorical[:, 0].tolist()
    item_vocab = data.spec.vocabularies["item"]
    assert codes == [RESERVED + list(item_vocab.values).index("i1"), OOV_INDEX, NULL_INDEX]
    # Scoring maps the same ids the same way, through the spec a checkpoint keeps.
    restored = FeatureSpec.from_state(data.spec.state())
    again, _, _ = model_inputs(pq.read_table(test), restored, "test")
    assert torch.equal(again, data.tables["test"].categorical)


def test_a_training_split_of_one_id_type_per_column(tmp_path) -> None:
    a = write(tmp_path / "a.parquet", item=[1, 2], click=[0, 1])
    b = write(tmp_path / "b.parquet", item=["1", "2"], click=[1, 0])
    data = ImpressionDataModule(
        categorical=["item"],
        dense=[],
        behaviours={"click": "click"},
        group_key="item",
        train=[a, b],
        val=a,
        test=a,
    )
    with pytest.raises(DataError, match="id column 'item' holds string values"):
        data.prepare(build_scheme(label="click"))


def test_resuming_on_other_training_ids_is_refused() -> None:
    from train.data.stats import TrainStats
    from train.model import DNN
    from train.module import RankingModule, VocabularyMismatch

    def module(ids: list[int]) -> RankingModule:
        spec = FeatureSpec(
            categorical={"item": "vocab"},
            dense=[],
            behaviours={"click": "click"},
            group_key="item",
        ).with_vocabularies({"item": vocabulary(ids)})
        stats = TrainStats(1, [], [], [], {"click": 0.5}, {"click": 0.5})
        network = DNN(spec.cardinalities, 0, hidden=(4,), embedding_dim=2)
        return RankingModule(network, build_scheme(label="click"), spec, stats, torch.optim.Adam)

    saved = {"upweight": module([1, 2, 3]).artifact, "state_dict": {}}
    module([1, 2, 3]).on_load_checkpoint(saved)  # the same ids: fine
    with pytest.raises(VocabularyMismatch, match="vocabulary of table 'item' differs"):
        module([1, 2, 4]).on_load_checkpoint(saved)
