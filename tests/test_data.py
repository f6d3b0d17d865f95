"""The data module on real files: memory and stream mode see the same rows, statistics and
metrics; CSV/TSV with and without a header; behaviours in other units; and every kind of bad
input stops `prepare()` with an error naming the file, the column and what was expected."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import quiet_trainer, scalars
from train.data.features import NULL_BUCKET, DataError, featurize, hash_ids
from train.data.io import expand
from train.data.module import ImpressionDataModule
from train.data.stats import TrainStats
from train.data.synthetic import FeedSimulator
from train.model import DNN
from train.module import RankingModule
from train.optim import SparseDenseAdam
from train.weights import SchemeError, build_scheme

SIM = FeedSimulator(n_train=3000, n_val=900, n_test=700, n_users=60, n_videos=120, n_authors=20)
ROLES = {
    "categorical": {"user_id": 100, "video_id": 200, "author_id": 50, "device": 8},
    "dense": ["video_len_s", "video_age_days", "author_followers_log"],
    "behaviours": {"click": "click", "finish": "finish", "watch_time": "watch_s"},
    "group_key": "user_id",
}
SCHEME = build_scheme(
    label="click",
    terms=[{"behaviour": "finish", "coef": 3}, {"behaviour": "watch_time", "transform": "log1p"}],
)


def write_feed(folder: Path, fmt: str = "parquet", shards=(0.2, 0.7, 1.0), group_rows=256):
    """The simulator's splits as uneven shards (Parquet with small row groups, or CSV)."""
    for split in ("train", "val", "test"):
        table = SIM.table(split)
        (folder / split).mkdir(parents=True)
        start = 0
        for i, end in enumerate(shards):
            stop = int(end * table.num_rows)
            part = table.slice(start, stop - start)
            start = stop
            path = folder / split / f"part-{i}.{fmt}"
            if fmt == "parquet":
                pq.write_table(part, path, row_group_size=group_rows)
            else:
                pacsv.write_csv(scalars(part), path)
    return folder


def module(folder: Path, **kwargs) -> ImpressionDataModule:
    options = {
        "train": f"{folder}/train",
        "val": f"{folder}/val",
        "test": f"{folder}/test",
        "batch_size": 128,
        "eval_batch_size": 200,
        "num_workers": 0,
        "shuffle_buffer": 500,
        **ROLES,
    }
    options.update(kwargs)
    return ImpressionDataModule(**options)


def rows_of(batches) -> Counter:
    """Every row of the batches as a hashable tuple (ids, group if the batches have it, dense,
    behaviours)."""
    out: Counter = Counter()
    for b in batches:
        group = [] if b.group is None else [b.group[:, None].double()]
        parts = [b.categorical.double(), *group, b.dense.double()]
        parts.append(b.behaviours.double())
        out.update(map(tuple, torch.cat(parts, 1).nan_to_num(-999.0).tolist()))
    return out


@pytest.fixture(scope="module")
def feed(tmp_path_factory) -> Path:
    return write_feed(tmp_path_factory.mktemp("feed"))


# --------------------------------------------------------------------------- memory vs stream


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_memory_and_stream_feed_the_same_rows_and_statistics(tmp_path, fmt):
    folder = write_feed(tmp_path, fmt)
    memory, stream = module(folder, mode="memory"), module(folder, mode="stream")
    stats = memory.prepare(SCHEME)
    assert stream.prepare(SCHEME) == stats, "bit-identical statistics in both modes"
    assert stats.rows == 3000 and memory.weight_mean == stream.weight_mean == stats.weight_mean
    train_m, train_s = memory.train_dataloader(), stream.train_dataloader()
    for _ in range(2):
        a, b = list(train_m), list(train_s)
        assert len(a) == len(train_m) == len(b) == len(train_s)
        assert rows_of(a) == rows_of(b), "same multiset of rows every epoch"
        assert sum(len(x) for x in b) == 3000
        # Only the evaluation metrics read the group: training batches do not carry it.
        assert all(x.group is None and x.oracle is None for x in a + b)
    for split in ("val", "test"):
        evaluation = list(memory._eval(split))
        assert all(x.group is not None and len(x.group) == len(x) for x in evaluation)
        assert rows_of(evaluation) == rows_of(stream._eval(split))


def test_statistics_are_those_of_the_whole_split(feed):
    data = module(feed, mode="stream")
    stats = data.prepare(SCHEME)
    whole = featurize(SIM.table("train"), data.spec, "train")
    expected = TrainStats.of(
        whole,
        data.spec.behaviour_names,
        SCHEME.weights(whole.behaviours, data.spec.behaviour_names),
    )
    np.testing.assert_allclose(stats.dense_mean, expected.dense_mean, rtol=1e-12)
    np.testing.assert_allclose(stats.dense_std, expected.dense_std, rtol=1e-9)
    assert stats.continuous == expected.continuous == ["watch_time"]
    assert stats.positive_rate == pytest.approx(expected.positive_rate, rel=1e-12)
    assert stats.weight_mean == pytest.approx(expected.weight_mean, rel=1e-12)


def test_memory_and_stream_give_the_same_metrics(feed):
    torch.manual_seed(0)
    results = []
    for mode in ("memory", "stream"):
        data = module(feed, mode=mode, num_workers=2 if mode == "stream" else 0)
        stats = data.prepare(SCHEME)
        torch.manual_seed(0)
        net = DNN(data.spec.cardinalities, len(data.spec.dense), hidden=(8,), embedding_dim=4)
        ranking = RankingModule(net, SCHEME, data.spec, stats, optimizer=SparseDenseAdam)
        trainer = quiet_trainer(accelerator="cpu", devices=1, use_distributed_sampler=False)
        trainer.validate(ranking, datamodule=data, verbose=False)
        results.append({k: float(v) for k, v in trainer.callback_metrics.items()})
    assert results[0].keys() == results[1].keys() and "val/click/auc" in results[0]
    for key, value in results[0].items():
        assert results[1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_saved_statistics_skip_the_training_pass(feed):
    first = module(feed, mode="stream")
    stats = first.prepare(SCHEME)
    again = module(feed, mode="stream", train=f"{feed}/no-such-folder")
    assert again.prepare(stats=stats, splits=("val", "test")) == stats
    assert sum(u.rows for u in again.units["val"]) == 900
    with pytest.raises(DataError, match="saved training stats"):
        module(feed).prepare(splits=("val",))


def test_auto_mode_streams_past_the_memory_limit(feed):
    small = module(feed, mode="auto", memory_limit_gb=1.0)
    small.prepare(SCHEME)
    assert small.mode == "memory" and small.tables["train"].categorical.shape == (3000, 4)
    tiny = module(feed, mode="auto", memory_limit_gb=1e-6)
    tiny.prepare(SCHEME)
    assert tiny.mode == "stream" and not tiny.tables and len(tiny.units["train"]) >= 3


# --------------------------------------------------------------------------- formats and roles


def test_tsv_without_header_reads_like_parquet(tmp_path, feed):
    table = scalars(SIM.table("train"))
    names = table.column_names
    path = tmp_path / "train.txt"
    with pa.OSFile(str(path), "wb") as out:
        pacsv.write_csv(
            scalars(table), out, pacsv.WriteOptions(include_header=False, delimiter="\t")
        )
    for mode in ("memory", "stream"):
        data = module(feed, train=str(path), header=False, column_names=names, mode=mode)
        stats = data.prepare(SCHEME)
        assert stats.rows == 3000
        reference = module(feed, mode="memory")
        ref_stats = reference.prepare(SCHEME)
        assert stats.positive_rate == ref_stats.positive_rate
        np.testing.assert_allclose(stats.dense_mean, ref_stats.dense_mean, rtol=1e-6)


def test_behaviour_in_other_units_is_scaled(tmp_path):
    n = 400
    rng = np.random.default_rng(0)
    play_ms = np.where(rng.random(n) < 0.3, rng.integers(1, 60_000, n), 0)
    table = pa.table(
        {
            "user_id": rng.integers(0, 20, n),
            "is_click": (play_ms > 0).astype(np.int8),
            "play_time_ms": play_ms,
        }
    )
    for split in ("train", "val", "test"):
        pq.write_table(table, tmp_path / f"{split}.parquet")
    for mode in ("memory", "stream"):
        data = ImpressionDataModule(
            train=str(tmp_path / "train.parquet"),
            val=str(tmp_path / "val.parquet"),
            test=str(tmp_path / "test.parquet"),
            categorical={"user_id": 50},
            dense=[],
            behaviours={
                "click": "is_click",
                "watch_time": {"column": "play_time_ms", "scale": 0.001},
            },
            group_key="user_id",
            mode=mode,
            num_workers=0,
        )
        stats = data.prepare(build_scheme(label="click"))
        assert stats.behaviour_mean["watch_time"] == pytest.approx(play_ms.mean() / 1000, rel=1e-6)
        assert stats.continuous == ["watch_time"]
        assert data.spec.behaviour_scale == {"watch_time": 0.001}
        batch = next(iter(data.val_dataloader()))
        assert float(batch.behaviours[:, 1].max()) == pytest.approx(play_ms.max() / 1000, rel=1e-6)


def test_behaviour_spec_errors_name_the_key():
    with pytest.raises(DataError, match=r"data.behaviours.watch_time.*unknown \['unit'\]"):
        ImpressionDataModule(
            train="x", val="x", test="x", categorical={"u": 10}, dense=[], group_key="u",
            behaviours={"watch_time": {"column": "ms", "unit": "ms"}},
        )  # fmt: skip
    with pytest.raises(DataError, match=r"watch_time.scale must be a finite number > 0"):
        ImpressionDataModule(
            train="x", val="x", test="x", categorical={"u": 10}, dense=[], group_key="u",
            behaviours={"watch_time": {"column": "ms", "scale": -1}},
        )  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mode", "disk", "data.mode must be one of"),
        ("dense_fill", "median", "data.dense_fill must be one of"),
        ("num_workers", -1, "data.num_workers must be >= 0"),
        ("worker_start", "teleport", "data.worker_start='teleport' is not available"),
    ],
)
def test_settings_are_checked(feed, key, value, message):
    with pytest.raises(DataError, match=message):
        data = module(feed, **({"mode": "stream", "num_workers": 1} | {key: value}))
        data.prepare(SCHEME)
        list(data.train_dataloader())


def test_dense_fill_is_kept_for_the_model(feed):
    assert module(feed).spec.dense_fill == "mean"
    data = module(feed, dense_fill="zero")
    assert data.spec.dense_fill == "zero"
    stats = data.prepare(SCHEME)
    net = DNN(data.spec.cardinalities, len(data.spec.dense), hidden=(8,), embedding_dim=4)
    ranking = RankingModule(net, SCHEME, data.spec, stats, optimizer=SparseDenseAdam)
    assert ranking.preprocess.fill == "zero" and ranking.artifact["spec"]["dense_fill"] == "zero"


def test_nulls_go_to_the_null_bucket_and_nan_dense_stays_for_the_fill(tmp_path):
    table = SIM.table("train").slice(0, 500)
    user = pa.array([None if i % 7 == 0 else v for i, v in enumerate(table["user_id"].to_pylist())])
    device = pa.array(
        [None if i % 5 == 0 else v for i, v in enumerate(table["device"].to_pylist())]
    )
    table = table.set_column(0, "user_id", user).set_column(5, "device", device)
    for split in ("train", "val", "test"):
        pq.write_table(table, tmp_path / f"{split}.parquet", row_group_size=100)
    for mode in ("memory", "stream"):
        data = module(tmp_path, mode=mode, train=str(tmp_path / "train.parquet"),
                      val=str(tmp_path / "val.parquet"), test=str(tmp_path / "test.parquet"))  # fmt: skip
        stats = data.prepare(SCHEME)
        batch = next(iter(data.val_dataloader()))
        rows = torch.arange(len(batch))
        assert (batch.categorical[rows % 7 == 0, 0] == NULL_BUCKET).all()
        assert (batch.categorical[rows % 7 != 0, 0] != NULL_BUCKET).all()
        assert (batch.categorical[rows % 5 == 0, 3] == NULL_BUCKET).all()
        assert torch.isnan(batch.dense).any(), "NaN reaches the module, which fills it"
        assert all(math.isfinite(m) for m in stats.dense_mean)


def test_string_ids_hash_the_same_read_plain_or_dictionary_encoded(feed):
    data = module(feed, mode="memory")
    data.prepare(SCHEME)
    assert data.dictionary == ["device"]
    plain = SIM.table("val")["device"].combine_chunks()
    column = data.spec.cardinalities[list(data.spec.categorical).index("device")]
    np.testing.assert_array_equal(
        data.tables["val"].categorical[:, 3].numpy(), hash_ids(plain, column)
    )


def test_shards_expand_in_a_stable_sorted_order(tmp_path):
    for name in ["b/part-10.parquet", "a/part-2.parquet", "a/part-1.parquet", "b/_SUCCESS"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    by_folder = expand(str(tmp_path))
    assert by_folder == sorted(by_folder) and len(by_folder) == 3
    assert expand(f"{tmp_path}/*/part-*.parquet") == by_folder
    assert expand([str(tmp_path / "b"), str(tmp_path / "a")]) == by_folder[2:] + by_folder[:2]


# --------------------------------------------------------------------------- bad input


def write(path: Path, table: pa.Table, fmt: str = "parquet") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(scalars(table), path)
    return str(path)


def bad_module(tmp_path: Path, feed: Path, mode: str, split: str, url: str, **kw):
    urls = {s: f"{feed}/{s}" for s in ("train", "val", "test")} | {split: url}
    return module(feed, mode=mode, **urls, **kw)


def sample(rows: int = 50) -> pa.Table:
    return SIM.table("train").slice(0, rows)


BAD = {
    "missing column": (
        lambda d: write(d / "x.parquet", sample().drop_columns(["watch_s"])),
        r"x.parquet: missing column\(s\) \['watch_s'\]",
    ),
    "string in a dense column": (
        lambda d: write(
            d / "x.parquet",
            sample().set_column(6, "video_len_s", pa.array(["long"] * 50)),
        ),
        r"x.parquet: dense column 'video_len_s' has type string; expected numbers",
    ),
    "string in a behaviour column (csv)": (
        lambda d: write(
            d / "x.csv", sample().set_column(10, "click", pa.array(["yes"] * 50)), "csv"
        ),
        r"x.csv: behaviour 'click' \(column 'click'\) has type string; expected numbers",
    ),
    "negative behaviour": (
        lambda d: write(
            d / "x.parquet",
            sample().set_column(13, "watch_s", pa.array([-1.0] + [0.0] * 49, pa.float32())),
        ),
        r"x.parquet: behaviour 'watch_time' \(column 'watch_s'\) has 1 value.*negative",
    ),
    "NaN behaviour": (
        lambda d: write(
            d / "x.parquet",
            sample().set_column(11, "finish", pa.array([float("nan")] * 2 + [0.0] * 48)),
        ),
        r"x.parquet: behaviour 'finish' \(column 'finish'\) has 2 value.*NaN",
    ),
    "empty file": (
        lambda d: (
            (d.mkdir(parents=True, exist_ok=True), (d / "x.parquet").write_bytes(b""))
            and str(d / "x.parquet")
        ),
        r"x.parquet: the file is empty \(0 bytes\); expected a parquet file",
    ),
    "parquet without rows": (
        lambda d: write(d / "x.parquet", sample(0)),
        r"x.parquet: the file has no rows",
    ),
    "csv with a header only": (
        lambda d: write(d / "x.csv", sample(0), "csv"),
        r"x.csv: the file has no rows",
    ),
    "corrupt parquet": (
        lambda d: (
            (d.mkdir(parents=True, exist_ok=True), (d / "x.parquet").write_text("a,b\n1,2\n"))
            and str(d / "x.parquet")
        ),
        r"x.parquet: not a readable parquet file",
    ),
    "glob matching nothing": (
        lambda d: f"{d}/nothing-*.parquet",
        r"nothing-\*.parquet: the glob matches no file",
    ),
    "folder without data files": (
        lambda d: (d.mkdir(parents=True), (d / "notes.md").write_text("hi")) and str(d),
        r"the folder holds no .parquet/.csv/.tsv file",
    ),
    "no such file": (lambda d: f"{d}/absent.parquet", r"absent.parquet: no such file or folder"),
    "non-integral float ids": (
        lambda d: write(d / "x.parquet", sample().set_column(0, "user_id", pa.array([0.5] * 50))),
        r"x.parquet: group_key column 'user_id' has double \(non-integral float ids\)",
    ),
}


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_named_before_training(tmp_path, feed, mode, case):
    make, message = BAD[case]
    url = make(tmp_path / "bad")
    with pytest.raises(DataError, match=message):
        bad_module(tmp_path, feed, mode, "train", url).prepare(SCHEME)


@pytest.mark.parametrize(
    "case", ["negative behaviour", "string in a dense column", "missing column"]
)
def test_bad_evaluation_split_is_caught_in_stream_mode_too(tmp_path, feed, case):
    make, message = BAD[case]
    url = make(tmp_path / "bad")
    with pytest.raises(DataError, match=message):
        bad_module(tmp_path, feed, "stream", "test", url).prepare(SCHEME)


def test_ids_of_two_types_across_shards_are_refused(tmp_path, feed):
    table = sample()
    write(tmp_path / "mix" / "a.parquet", table)
    write(
        tmp_path / "mix" / "b.parquet",
        table.set_column(0, "user_id", table["user_id"].cast(pa.string())),
    )
    with pytest.raises(
        DataError,
        match=r"b.parquet: id column 'user_id' holds string values but .*a.parquet holds int",
    ):
        bad_module(tmp_path, feed, "stream", "train", str(tmp_path / "mix")).prepare(SCHEME)


def test_a_scheme_that_reads_a_missing_behaviour_fails_first(feed):
    with pytest.raises(SchemeError, match="like"):
        module(feed).prepare(build_scheme(label="click", terms=[{"behaviour": "like"}]))
