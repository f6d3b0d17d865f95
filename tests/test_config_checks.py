"""Every value checked, fast: each config key with a domain and each data value the job cannot
use stops the job, run in this process, with `error: <key>=<value>: expected <domain>` (or the
file, column and what was expected), before anything is read or written: a run folder from an
earlier job is left byte for byte, and a new one is not left behind. The subprocess corpus
(tests/test_bad_inputs.py) proves the exit code and the absence of a traceback on a
representative few; these cases cost a fraction of a second each."""

from __future__ import annotations

import datetime
import decimal
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from tests.helpers import compose, train_in_process
from tests.test_bad_inputs import SPEC, N, table
from train import config_checks, serve
from train.config_checks import integer, number, one_of, optional, require
from train.data.features import DataConfigError, DataError, FeatureSpec, hash_ids
from train.data.io import TableFormat
from train.data.module import ImpressionDataModule
from train.data.synthetic import FeedSimulator
from train.errors import ConfigError, UpweightError
from train.model import DNN, MultiHead, check_config
from train.optim import adam, cosine
from train.weights import SchemeError, build_scheme

ROLES = SPEC  # the column roles of `table()`, shared with the subprocess corpus


def replace(t: pa.Table, name: str, values: pa.Array | list) -> pa.Table:
    values = values if isinstance(values, pa.Array) else pa.array(values)
    return t.set_column(t.schema.get_field_index(name), name, values)


def one_value(t: pa.Table, name: str, value: float, row: int = 7) -> pa.Table:
    column = [float(v) for v in t[name].to_pylist()]
    column[row] = value
    return replace(t, name, column)


BAD_FILES: dict[str, Callable[[pa.Table], pa.Table]] = {
    "dense_inf": lambda t: one_value(t, "x", float("-inf")),
    "dense_overflow": lambda t: one_value(t, "x", 1e39),  # beyond float32: infinite there
    "dense_all_null": lambda t: replace(t, "x", pa.nulls(N, pa.float64())),
    "dense_timestamp": lambda t: replace(t, "x", [datetime.datetime(2024, 5, 1)] * N),
    "click_none": lambda t: replace(t, "click", [0] * N),
    "click_all": lambda t: replace(t, "click", [1] * N),
    "click_str": lambda t: replace(t, "click", [str(v) for v in t["click"].to_pylist()]),
    "id_binary": lambda t: replace(t, "video_id", [b"\x00\x01"] * N),
    "id_nested": lambda t: replace(t, "video_id", [[1, 2]] * N),
    "id_inf": lambda t: one_value(t, "video_id", float("inf")),
    "id_half": lambda t: one_value(t, "video_id", 2.5),
}
GOOD_FILES: dict[str, Callable[[pa.Table], pa.Table]] = {
    "click_bool": lambda t: replace(t, "click", [bool(v) for v in t["click"].to_pylist()]),
    "id_uint64": lambda t: replace(t, "video_id", pa.array([2**63 + i for i in range(N)], pa.uint64())),
    "id_negative": lambda t: replace(t, "video_id", [-v for v in t["video_id"].to_pylist()]),
    "id_nan": lambda t: one_value(t, "video_id", float("nan")),
    "dense_big_int": lambda t: replace(t, "x", pa.array(range(2**40, 2**40 + N * 2**20, 2**20))),
    "dense_decimal": lambda t: replace(t, "x", [decimal.Decimal(f"{v:.2f}") for v in t["x"].to_pylist()]),
    "dense_some_nan": lambda t: one_value(t, "x", float("nan")),
}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("values")
    pq.write_table(table(), folder / "good.parquet")
    for name, change in {**BAD_FILES, **GOOD_FILES}.items():
        pq.write_table(change(table()), folder / f"{name}.parquet")
    rows = "".join(f"{i % 60},{i % 90},{i / 10},{int(i % 3 == 0)},0,{i}\n" for i in range(N))
    (folder / "twice.csv").write_text("user_id,video_id,x,click,like,x\n" + rows)
    (folder / "a_file").write_text("not a folder\n")
    return folder


# ------------------------------------------------------------------ the job, in this process

BASE = {
    "data": "files",
    "data.categorical": "{user_id: 50, video_id: 80}",
    "data.dense": "[x]",
    "data.behaviours": "{click: click, like: like}",
    "data.group_key": "user_id",
    "data.batch_size": "64",
    "data.mode": "memory",
    "hardware": "cpu",
    "logger": "csv",
    "trainer.max_epochs": "1",
    "trainer.enable_progress_bar": "false",
}
DROP = None


@dataclass(frozen=True)
class Case:
    changes: dict[str, str | None]  # overrides; None drops a key of BASE
    expected: tuple[str, ...]  # fragments of the message after `error: `
    train: str = "good.parquet"  # the training file (val and test read good.parquet)
    extra: tuple[str, ...] = field(default_factory=tuple)  # overrides added as they are


def dotted(**changes: str | None) -> dict[str, str | None]:
    return {k.replace("__", "."): v for k, v in changes.items()}


CONFIG_CASES: dict[str, Case] = {
    # data: sizes, modes, formats
    "batch size 0": Case(dotted(data__batch_size="0"), ("data.batch_size=0: expected an integer >= 1",)),
    "batch size text": Case(dotted(data__batch_size="many"), ("data.batch_size='many'", "integer")),
    "batch size float": Case(dotted(data__batch_size="64.5"), ("data.batch_size=64.5",)),
    "eval batch size 0": Case(dotted(data__eval_batch_size="0"), ("data.eval_batch_size=0",)),
    "num_workers negative": Case(dotted(data__num_workers="-1"), ("data.num_workers", "-1", ">= 0")),
    "shuffle buffer 0": Case(dotted(data__shuffle_buffer="0"), ("data.shuffle_buffer=0",)),
    "memory limit 0": Case(dotted(data__memory_limit_gb="0"), ("data.memory_limit_gb=0", "> 0")),
    "memory limit nan": Case(dotted(data__memory_limit_gb="nan"), ("data.memory_limit_gb=nan",)),
    "mode": Case(dotted(data__mode="disk"), ("data.mode", "'disk'", "memory")),
    "format": Case(dotted(data__format="xlsx"), ("data.format='xlsx': expected one of auto",)),
    "delimiter of two characters": Case(dotted(data__delimiter="';;'"), ("data.delimiter=';;'", "one character")),
    "header not a boolean": Case(dotted(data__header="sometimes"), ("data.header='sometimes'", "true or false")),
    "worker start": Case(dotted(data__worker_start="teleport"), ("data.worker_start='teleport'", "forkserver")),
    "dense fill": Case(dotted(data__dense_fill="median"), ("data.dense_fill", "median")),
    "storage options not a mapping": Case(dotted(data__storage_options="anon"), ("data.storage_options='anon'", "mapping")),
    "train split a number list": Case(dotted(data__train="[1,2]"), ("data.train=[1, 2]",)),
    # data: roles
    "buckets 1": Case(dotted(**{"data.categorical.video_id": "1"}), ("data.categorical.video_id=1: expected an integer >= 2",)),
    "buckets text": Case(dotted(**{"data.categorical.video_id": "lots"}), ("data.categorical.video_id='lots'",)),
    "categorical a number": Case(
        dotted(data__categorical=DROP), ("data.categorical=5", "a list of columns", "a mapping column -> hash buckets"),
        extra=("data.categorical=5",),
    ),
    "categorical list entry a list": Case(
        dotted(data__categorical=DROP), ("data.categorical: entry ['video_id']", "neither a column name"),
        extra=("data.categorical=[user_id,[video_id]]",),
    ),
    "sequence table unknown": Case(
        dotted(data__sequences="{hist: {table: vid, max_len: 3}}"), ("data.sequences.hist.table='vid'", "a column of data.categorical"),
    ),
    "sequence max_len 0": Case(
        dotted(data__sequences="{hist: {table: video_id, max_len: 0}}"), ("data.sequences.hist.max_len=0", "integer >= 1"),
    ),
    "sequence pooling": Case(
        dotted(data__sequences="{hist: {table: video_id, max_len: 3, pooling: max}}"), ("data.sequences.hist.pooling='max'", "mean, sum, attention"),
    ),
    "sequence not a mapping": Case(dotted(data__sequences="[hist]"), ("data.sequences=['hist']", "expected a mapping")),
    "list column holds scalars": Case(
        dotted(data__dense="[]", data__sequences="{x: {buckets: 10, max_len: 3, pooling: sum}}"),
        ("good.parquet", "list column 'x' (data.sequences.x) has type double", "expected a list"),
    ),
    "dense as a string": Case(dotted(data__dense="x"), ("data.dense='x': expected a list of column names",)),
    "dense twice": Case(dotted(data__dense="[x,x]"), ("data.dense=['x', 'x']", "distinct", "['x'] twice")),
    "dense not names": Case(dotted(data__dense="[[x]]"), ("data.dense[0]=['x']", "column name")),
    "behaviours as a list": Case(
        dotted(data__behaviours=DROP), ("data.behaviours=['click']", "mapping behaviour -> column"),
        extra=("data.behaviours=[click]",),
    ),
    "behaviours empty": Case(dotted(data__behaviours=DROP), ("data.behaviours={}",), extra=("data.behaviours={}",)),
    "behaviour scale 0": Case(
        dotted(data__behaviours=DROP), ("like.scale", "> 0"), extra=("data.behaviours={click: click, like: {column: like, scale: 0}}",)
    ),
    "group key a list": Case(dotted(data__group_key="[user_id]"), ("data.group_key=['user_id']", "column name")),
    "behaviour as a dense feature": Case(dotted(data__dense="[x,click]"), ("data.dense uses column 'click'", "data.behaviours.click", "leaks the label")),
    "behaviour as an id feature": Case(
        dotted(data__categorical=DROP), ("data.categorical uses column 'like'", "data.behaviours.like"),
        extra=("data.categorical={user_id: 50, like: 4}",),
    ),
    "behaviour as the group key": Case(dotted(data__group_key="click"), ("data.group_key uses column 'click'",)),
    "no feature at all": Case(
        dotted(data__categorical=DROP, data__dense="[]"), ("data.categorical={} and data.dense=[]", "at least one feature"),
        extra=("data.categorical={}",),
    ),
    "dense but no categorical": Case(
        dotted(data__categorical=DROP), ("data.categorical={}", "at least one categorical feature", "['x']"),
        extra=("data.categorical={}",),
    ),
    "embedding tables beyond memory": Case(
        dotted(**{"data.categorical.video_id": "100000000000000"}), ("hash buckets x model.embedding_dim=16", "GiB"),
    ),
    "unknown data key": Case({}, ("data.colour=1: not an argument of train.data.module.ImpressionDataModule",), extra=("+data.colour=1",)),
    # the model
    "embedding dim 0": Case(dotted(model__embedding_dim="0"), ("model.embedding_dim=0: expected an integer >= 1",)),
    "hidden with a 0": Case(dotted(model__hidden="[64,0]"), ("model.hidden=[64, 0]: expected a list of integers >= 1",)),
    "hidden a string": Case(dotted(model__hidden="wide"), ("model.hidden='wide'",)),
    "dropout 1": Case(dotted(model__dropout="1.0"), ("model.dropout=1.0: expected a number in [0, 1)",)),
    "dropout negative": Case(dotted(model__dropout="-0.1"), ("model.dropout=-0.1",)),
    "activation": Case(dotted(model__activation="swish"), ("model.activation='swish': expected one of relu",)),
    "sparse not a boolean": Case(dotted(model__sparse_embeddings="maybe"), ("model.sparse_embeddings='maybe'",)),
    "multihead tower": Case(dotted(model="multihead", model__head_hidden="[0]"), ("model.head_hidden=[0]",)),
    "multihead fusion of no head": Case(dotted(model="multihead", model__fusion="{share: 1}"), ("model.fusion names 'share'",)),
    "unknown model key": Case({}, ("model.width=3: not an argument of train.model.DNN",), extra=("+model.width=3",)),
    # optimizer and scheduler
    "lr nan": Case(dotted(optimizer__lr="nan"), ("optimizer.lr=nan: expected a finite number > 0",)),
    "lr inf": Case(dotted(optimizer__lr="inf"), ("optimizer.lr=inf",)),
    "lr 0": Case(dotted(optimizer__lr="0"), ("optimizer.lr=0: expected a finite number > 0",)),
    "lr negative": Case(dotted(optimizer__lr="-0.01"), ("optimizer.lr=-0.01",)),
    "lr text": Case(dotted(optimizer__lr="fast"), ("optimizer.lr='fast'",)),
    "weight decay negative": Case(dotted(optimizer__weight_decay="-1e-5"), ("optimizer.weight_decay=-1e-05: expected a finite number >= 0",)),
    "warmup negative": Case(dotted(scheduler="cosine", scheduler__warmup_steps="-5"), ("scheduler.warmup_steps=-5",)),
    "floor above 1": Case(dotted(scheduler="cosine", scheduler__floor="2"), ("scheduler.floor=2",)),
    # weight scheme
    "negative weight below 0": Case(dotted(weights__negative_weight="-1"), ("weights.negative_weight", "-1", ">= 0")),
    "negative weight text": Case(dotted(weights__negative_weight="half"), ("weights.negative_weight", "'half'")),
    "terms a string": Case(dotted(weights__terms="like"), ("weights.terms='like': expected a list of terms",)),
    "term a string": Case(dotted(weights__terms="[like]"), ("weights.terms[0]='like': expected a mapping",)),
    "negative coefficient": Case(dotted(weights__terms="[{behaviour: like, coef: -2}]"), ("coef must be a finite number >= 0", "'like'")),
    "weight transform": Case(
        dotted(weights__terms="[{behaviour: like, coef: 2, transform: square}]"), ("transform 'square'", "indicator"),
    ),
    "label a list": Case(dotted(weights__label="[click]"), ("weights.label=['click']",)),
    # trainer, callbacks, job keys
    "max epochs -2": Case(dotted(trainer__max_epochs="-2"), ("trainer.max_epochs=-2: expected an integer >= 0 or -1",)),
    "min above max epochs": Case(dotted(trainer__min_epochs="3"), ("trainer.min_epochs=3 is above trainer.max_epochs=1",)),
    "precision": Case(dotted(trainer__precision="bogus"), ("trainer.precision='bogus': expected one of", "bf16-mixed")),
    "hardware precision": Case(dotted(hardware__precision="half"), ("hardware.precision='half'",)),
    "devices 0": Case(dotted(hardware__devices="0"), ("hardware.devices=0",)),
    "accelerator": Case(dotted(trainer__accelerator="tpu"), ("trainer.accelerator='tpu'",)),
    "gradient clip negative": Case(dotted(trainer__gradient_clip_val="-1"), ("trainer.gradient_clip_val=-1",)),
    "limit batches above 1": Case(dotted(trainer__limit_val_batches="1.5"), ("trainer.limit_val_batches=1.5",)),
    "progress bar not a boolean": Case(dotted(trainer__enable_progress_bar="sometimes"), ("trainer.enable_progress_bar='sometimes'",)),
    "unknown trainer key": Case({}, ("trainer.speed=2: not an argument of lightning.Trainer",), extra=("+trainer.speed=2",)),
    "patience negative": Case(dotted(callbacks__early_stopping__patience="-1"), ("callbacks.early_stopping.patience=-1: expected an integer >= 0",)),
    "min delta negative": Case(dotted(callbacks__early_stopping__min_delta="-0.1"), ("callbacks.early_stopping.min_delta=-0.1",)),
    "save top k": Case(dotted(callbacks__checkpoint__save_top_k="-2"), ("callbacks.checkpoint.save_top_k=-2",)),
    "seed text": Case(dotted(seed="lucky"), ("seed='lucky': expected an integer in [0, 4294967295]",)),
    "seed negative": Case(dotted(seed="-1"), ("seed=-1",)),
    "seed float": Case(dotted(seed="1.5"), ("seed=1.5",)),
    "xauc pairs 0": Case(dotted(xauc_pairs="0"), ("xauc_pairs=0: expected an integer >= 1",)),
    "ndcg k 0": Case(dotted(metrics__ndcg_k="0"), ("metrics.ndcg_k=0: expected an integer >= 1",)),
    "ndcg gain of no scheme": Case(dotted(metrics__ndcg_gain="nope"), ("metrics.ndcg_gain='nope': no weight scheme of that name", "conf/weights/nope.yaml")),
    "ndcg gain of a missing behaviour": Case(dotted(metrics__ndcg_gain="seed"), ("metrics.ndcg_gain='seed'", "reads behaviour 'finish'")),
    "monitor ndcg at another k": Case(dotted(monitor="val/click/ndcg@5"), ("monitor=val/click/ndcg@5 with metrics.ndcg_k=10", "@10")),
    "monitor not val": Case(dotted(monitor="train/loss"), ("monitor='train/loss': expected a validation metric",)),
    "monitor of no behaviour": Case(dotted(monitor="val/clik/auc"), ("monitor=val/clik/auc", "data.behaviours ['click', 'like']")),
    "monitor of no metric": Case(dotted(monitor="val/click/accuracy"), ("monitor=val/click/accuracy", "metric name")),
    "monitor in the wrong direction": Case(dotted(monitor="val/click/logloss"), ("monitor_mode=max", "expected monitor_mode=min")),
    "monitor mode": Case(dotted(monitor_mode="best"), ("monitor_mode='best': expected one of min, max",)),
    "resume": Case(dotted(resume="sometimes"), ("resume='sometimes': expected auto or false",)),
    "nonfinite": Case(dotted(nonfinite="ignore"), ("nonfinite='ignore': expected one of stop, skip",)),
    "init_from and ckpt_path": Case(dotted(init_from="a.ckpt", ckpt_path="b.ckpt"), ("init_from=a.ckpt and ckpt_path=b.ckpt",)),
    "unknown target": Case(dotted(**{"callbacks.last._target_": "train.nowhere.Thing"}), ("callbacks.last._target_='train.nowhere.Thing'",)),
}  # fmt: skip
DATA_CASES: dict[str, Case] = {
    "infinite dense value": Case({}, ("dense_inf.parquet: dense column 'x' has 1 infinite value", "-inf"), "dense_inf.parquet"),
    "dense value beyond float32": Case({}, ("dense_overflow.parquet: dense column 'x'", "float32"), "dense_overflow.parquet"),
    "dense column all null": Case({}, ("dense_all_null.parquet", "dense column(s) ['x'] hold no value", "data.dense"), "dense_all_null.parquet"),
    "timestamp as a dense feature": Case({}, ("dense_timestamp.parquet: dense column 'x' has type timestamp", "a date or time"), "dense_timestamp.parquet"),
    "label never positive": Case({}, ("click_none.parquet", "label behaviour 'click'", "0 in every row", "nothing to learn"), "click_none.parquet"),
    "label always positive": Case({}, ("click_all.parquet", "> 0 in every row", "expected some negative"), "click_all.parquet"),
    "behaviour as text": Case({}, ("click_str.parquet: behaviour 'click' (column 'click') has type string",), "click_str.parquet"),
    "binary ids": Case({}, ("id_binary.parquet: categorical column 'video_id' has type binary", "expected integer"), "id_binary.parquet"),
    "nested ids": Case({}, ("id_nested.parquet: categorical column 'video_id' has type list",), "id_nested.parquet"),
    "infinite float id": Case({}, ("id_inf.parquet: categorical column 'video_id'", "infinite float ids"), "id_inf.parquet"),
    "non-integral float id": Case({}, ("id_half.parquet", "non-integral float ids"), "id_half.parquet"),
    "a column named twice": Case({}, ("twice.csv: column(s) ['x'] appear more than once",), "twice.csv"),
    "simulator without validation rows": Case(
        {k: DROP for k in BASE if k.startswith("data")}, ("data.simulator.n_val=0: expected an integer >= 1",), "",
        ("data.simulator.n_val=0",),
    ),
    "simulator with files": Case(
        {k: DROP for k in BASE if k.startswith("data")}, ("data.train set, but data=synthetic simulates its splits",), "",
        ("data.train=x.parquet",),
    ),
}  # fmt: skip


def overrides(c: Case, data: Path) -> list[str]:
    splits = {
        "data.train": f"{data}/{c.train}",
        "data.val": f"{data}/good.parquet",
        "data.test": f"{data}/good.parquet",
    }
    out = {**BASE, **(splits if c.train else {}), **c.changes}
    out = {k: v for k, v in out.items() if v is not None}
    # Groups first (data=files, model=multihead), then keys: Hydra's order.
    groups = [f"{k}={v}" for k, v in out.items() if "." not in k]
    keys = [f"{k}={v}" for k, v in out.items() if "." in k]
    return [*groups, *keys, *c.extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def earlier_run(folder: Path) -> Path:
    """A run folder of an earlier, successful job."""
    run = folder / "earlier"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "metrics.json").write_text('{"test/click/auc": 0.7}\n')
    (run / "checkpoints" / "last.ckpt").write_bytes(bytes(range(256)) * 2)
    return run


def fails(args: list[str], output_dir: Path) -> str:
    """The job's `error: ...` message (it must exit with one)."""
    with pytest.raises(SystemExit) as info:
        train_in_process(*args, output_dir=output_dir)
    message = str(info.value.code)
    assert message.startswith("error: "), message
    return message


@pytest.mark.parametrize("name", list(CONFIG_CASES) + list(DATA_CASES))
def test_bad_value_is_named_and_nothing_is_written(name, data, tmp_path):
    c = CONFIG_CASES.get(name) or DATA_CASES[name]
    run = earlier_run(tmp_path)
    before = snapshot(run)
    message = fails(overrides(c, data), run)
    for fragment in c.expected:
        assert fragment in message, f"{name}: {fragment!r} not in\n{message}"
    assert snapshot(run) == before, f"{name}: the earlier run folder changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]


@pytest.mark.parametrize(
    "name", ["lr nan", "dense but no categorical", "infinite dense value", "label never positive"]
)
def test_a_failed_job_leaves_no_new_run_folder(name, data, tmp_path):
    c = CONFIG_CASES.get(name) or DATA_CASES[name]
    fails(overrides(c, data), tmp_path / "new_run")
    assert not (tmp_path / "new_run").exists()


def test_an_output_folder_under_a_file_is_refused(data, tmp_path):
    message = fails(overrides(Case({}, ()), data), data / "a_file" / "run")
    assert "paths.output_dir=" in message and "a_file is a file" in message
    assert (data / "a_file").read_text() == "not a folder\n"


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize(
    "name",
    ["infinite dense value", "dense column all null", "label never positive", "infinite float id"],
)
def test_data_values_are_checked_in_both_modes(name, mode, data):
    c = DATA_CASES[name]
    module = ImpressionDataModule(
        train=f"{data}/{c.train}",
        val=f"{data}/good.parquet",
        test=f"{data}/good.parquet",
        mode=mode,
        num_workers=0,
        **ROLES,
    )
    with pytest.raises(DataError) as info:
        module.prepare(build_scheme(label="click"))
    assert all(fragment in str(info.value) for fragment in c.expected), str(info.value)


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("split", ["val", "test"])
def test_an_infinite_dense_value_in_an_evaluation_split_is_named(split, mode, data):
    urls = {s: f"{data}/good.parquet" for s in ("train", "val", "test")}
    urls[split] = f"{data}/dense_inf.parquet"
    module = ImpressionDataModule(**urls, mode=mode, num_workers=0, **ROLES)
    with pytest.raises(DataError, match=r"dense_inf.parquet: dense column 'x' has 1 infinite"):
        module.prepare(build_scheme(label="click"))


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("name", list(GOOD_FILES))
def test_what_a_real_log_holds_is_read(name, mode, data):
    """Booleans as behaviours, uint64 ids beyond 2**63, negative ids, NaN as a missing float
    id, ints beyond float32's exact range and decimals as dense values: all fine."""
    module = ImpressionDataModule(
        train=f"{data}/{name}.parquet",
        val=f"{data}/{name}.parquet",
        test=f"{data}/good.parquet",
        mode=mode,
        num_workers=0,
        **ROLES,
    )
    stats = module.prepare(build_scheme(label="click"))
    assert stats.rows == N
    assert all(math.isfinite(v) for v in [*stats.dense_mean, *stats.dense_std])


def test_an_evaluation_split_without_a_positive_label_is_a_warning(data, tmp_path, caplog):
    pq.write_table(replace(table(), "click", [0] * N), tmp_path / "val.parquet")
    module = ImpressionDataModule(
        train=f"{data}/good.parquet",
        val=str(tmp_path / "val.parquet"),
        test=f"{data}/good.parquet",
        mode="memory",
        **ROLES,
    )
    with caplog.at_level(logging.WARNING, logger="train.data.stats"):
        module.prepare(build_scheme(label="click"))
    assert "val.parquet): label behaviour 'click' is 0 in every one of its 400 rows" in caplog.text


def test_a_constant_dense_column_is_a_warning(data, caplog):
    module = ImpressionDataModule(
        train=f"{data}/dense_big_int.parquet",
        val=f"{data}/good.parquet",
        test=f"{data}/good.parquet",
        mode="memory",
        **ROLES,
    )
    with caplog.at_level(logging.WARNING, logger="train.data.stats"):
        module.prepare(build_scheme(label="click"))
    # 2**40 + k * 2**20: float32 tells these apart (the hashed ids may warn of collisions)
    assert not [r for r in caplog.records if r.name == "train.data.stats"]
    pq.write_table(replace(table(), "x", pa.array([2**40 + i for i in range(N)])), data / "c.pq")
    module = ImpressionDataModule(
        train=f"{data}/c.pq", val=f"{data}/good.parquet", test=f"{data}/good.parquet",
        format="parquet", **ROLES,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="train.data.stats"):
        module.prepare(build_scheme(label="click"))
    assert "dense column 'x' holds one value" in caplog.text and "2**24" in caplog.text


# ------------------------------------------------------------------ hashing what logs hold


def test_ids_hash_as_the_served_model_hashes_them():
    """uint64 ids beyond 2**63 and NaN float ids (pandas' missing) bucket as serve.py does."""
    big = np.array([2**63 + 5, 2**64 - 1, 7], dtype=np.uint64)
    np.testing.assert_array_equal(hash_ids(pa.array(big), 1000), serve.hash_ids(big, 1000))
    floats = np.array([3.0, np.nan, -2.0])
    ours = hash_ids(pa.array(floats), 1000)
    np.testing.assert_array_equal(ours, serve.hash_ids(floats, 1000))
    assert ours[1] == 0
    assert ours[0] == hash_ids(pa.array([3]), 1000)[0]  # an integral float is its int
    # Read dictionary-encoded (pandas categoricals), NaN is still the null bucket.
    encoded = pa.array(floats).dictionary_encode()
    np.testing.assert_array_equal(hash_ids(encoded, 1000), ours)


# ------------------------------------------------------------------ the validators themselves


def test_rule_helpers_give_one_message_shape():
    with pytest.raises(ConfigError, match=r"^a\.b=0: expected an integer >= 1$"):
        require("a.b", 0, integer(1))
    with pytest.raises(ConfigError, match=r"^a=True: expected an integer$"):
        require("a", True, integer())  # a boolean is no number
    with pytest.raises(ConfigError, match=r"^a=nan: expected a finite number >= 0$"):
        require("a", float("nan"), number(0.0))
    with pytest.raises(ConfigError, match=r"^a='32': expected one of 32, 64$"):
        require("a", "32", one_of(32, 64))  # typed: "32" is not 32
    require("a", None, optional(integer(1)))
    with pytest.raises(DataConfigError, match=r"^data\.x=\[1\]"):
        require("data.x", [1], integer(), DataConfigError)
    assert issubclass(DataConfigError, DataError) and issubclass(DataConfigError, ConfigError)
    assert issubclass(ConfigError, UpweightError) and issubclass(SchemeError, UpweightError)


SHIPPED = [
    [],
    ["model=multihead"],
    ["weights=seed"],
    ["weights=engagement", "scheduler=cosine"],
    ["weights=watch_time", "logger=tensorboard", "hardware=gpus"],
    ["hardware=slurm", "monitor=val/click/logloss", "monitor_mode=min"],
    ["data=ali_ccp", "data.train=a", "data.val=a", "data.test=a"],
    ["data=icme2019", "data.train=a", "data.val=a", "data.test=a", "weights.label=finish",
     "monitor=val/finish/auc"],
    ["data=kuairand", "data.train=a", "data.val=a", "data.test=a", "weights=engagement"],
]  # fmt: skip


@pytest.mark.parametrize("choice", SHIPPED, ids=[" ".join(c) or "default" for c in SHIPPED])
def test_every_shipped_config_passes_its_own_checks(choice, tmp_path):
    from hydra.utils import instantiate

    cfg = compose(*choice, f"paths.output_dir={tmp_path / 'run'}")
    config_checks.check(OmegaConf.to_container(cfg, resolve=True))
    instantiate(cfg.weights)
    data = instantiate(cfg.data)
    assert data.spec.categorical and data.spec.behaviours


def test_a_partial_config_is_checked_for_what_it_has(tmp_path):
    config_checks.check({"seed": 3, "paths": {"output_dir": str(tmp_path)}})
    config_checks.check({})
    with pytest.raises(ConfigError, match=r"^seed=3\.5"):
        config_checks.check({"seed": 3.5})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categorical": 3}, r"data.categorical=3: expected a list of columns"),
        ({"categorical": {"user_id": 2.5}}, r"data.categorical.user_id=2.5: expected an integer"),
        ({"categorical": {"user_id": True}}, r"data.categorical.user_id=True"),
        ({"dense": "x"}, r"data.dense='x': expected a list"),
        ({"dense": ["x", ""]}, r"data.dense\[1\]='': expected a column name"),
        ({"behaviours": "click"}, r"data.behaviours='click': expected a mapping"),
        ({"behaviours": {"click": ["c"]}}, r"data.behaviours.click=\['c'\]: expected a column"),
        ({"group_key": None}, r"data.group_key=None: expected a column name"),
        ({"oracle": ["p"]}, r"data.oracle=\['p'\]: expected a mapping"),
        ({"oracle": {"click": "x"}}, r"data.dense uses column 'x', which is also data.oracle"),
        ({"categorical": {}, "dense": []}, r"expected at least one feature column"),
    ],
)
def test_roles_are_typed_and_used_once(kwargs, message):
    with pytest.raises(DataConfigError, match=message):
        ImpressionDataModule(train="a", val="a", test="a", **(ROLES | kwargs))


def test_numbered_columns_may_be_given_as_numbers():
    """YAML reads Ali-CCP's column `101` as an int: it names the column "101"."""
    module = ImpressionDataModule(
        train="a", val="a", test="a", categorical={101: 10, 205: 10}, dense=[7],
        behaviours={"click": 3, "buy": {"column": 4}}, group_key=101,
    )  # fmt: skip
    spec = module.spec
    assert spec == FeatureSpec(
        categorical={"101": 10, "205": 10}, dense=["7"],
        behaviours={"click": "3", "buy": "4"}, group_key="101",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "xls"}, r"data.format='xls'"),
        ({"delimiter": "\n"}, r"data.delimiter='\\n'"),
        ({"delimiter": '"'}, r"data.delimiter='\"'"),
        ({"header": "yes"}, r"data.header='yes'"),
        ({"header": False}, r"data.header=false needs data.column_names"),
        ({"header": False, "column_names": ["a", "a"]}, r"data.column_names=\['a', 'a'\]"),
        ({"column_names": "a,b"}, r"data.column_names='a,b': expected a list"),
    ],
)
def test_table_format_is_checked(kwargs, message):
    with pytest.raises(DataConfigError, match=message):
        TableFormat(**kwargs)


def test_tab_and_semicolon_delimiters_are_fine():
    assert TableFormat(delimiter="\t").csv_delimiter("x.csv") == "\t"
    assert TableFormat(delimiter="\\t").delimiter == "\t"  # data.delimiter='\t' in a shell
    assert TableFormat(delimiter=";", header=False, column_names=[1, "b"]).column_names == (
        "1",
        "b",
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"embedding_dim": 0}, r"model.embedding_dim=0"),
        ({"embedding_dim": 8.0}, r"model.embedding_dim=8.0"),
        ({"hidden": [32, -1]}, r"model.hidden=\[32, -1\]"),
        ({"hidden": 32}, r"model.hidden=32: expected a list"),
        ({"dropout": float("nan")}, r"model.dropout=nan"),
        ({"activation": "ReLU"}, r"model.activation='ReLU'"),
        ({"_target_": "train.model.MultiHead", "heads": "click"}, r"model.heads='click'"),
        ({"_target_": "train.model.MultiHead", "heads": ["a", "a"]}, r"distinct behaviours"),
        (
            {"_target_": "train.model.MultiHead", "heads": ["a"], "fusion": [1]},
            r"model.fusion=\[1\]: expected a mapping",
        ),
        (
            {"_target_": "train.model.MultiHead", "heads": ["a"], "fusion": {"a": "x"}},
            r"model.fusion.a must be a finite number",
        ),
    ],
)
def test_model_options_are_checked_without_building(config, message):
    with pytest.raises(ConfigError, match=message):
        check_config({"_target_": "train.model.DNN", **config})


def test_networks_check_their_own_arguments():
    with pytest.raises(ConfigError, match=r"model.hidden=\[0\]"):
        DNN([10], 1, hidden=[0])
    with pytest.raises(ConfigError, match=r"model.head_hidden=\[8, 0\]"):
        MultiHead([10], 1, ["click"], head_hidden=[8, 0])
    with pytest.raises(ConfigError, match=r"data.categorical=\{\}: expected at least one"):
        DNN([], 3)
    check_config({"_target_": "train.model.MultiHead", "heads": ["click"], "hidden": []})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: adam(lr=float("-inf")), r"optimizer.lr=-inf"),
        (lambda: adam(lr=True), r"optimizer.lr=True"),
        (lambda: adam(betas=0.9), r"optimizer.betas=0.9: expected two numbers"),
        (lambda: adam(weight_decay=float("nan")), r"optimizer.weight_decay=nan"),
        (lambda: cosine(warmup_steps=2.5), r"scheduler.warmup_steps=2.5"),
        (lambda: cosine(floor=float("nan")), r"scheduler.floor=nan"),
    ],
)
def test_optimizer_and_scheduler_values(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label": ""}, r"weights.label=''"),
        ({"name": 3}, r"weights.name=3"),
        ({"negative_weight": float("inf")}, r"weights.negative_weight"),
        ({"negative_weight": "1"}, r"weights.negative_weight"),
        ({"terms": {"behaviour": "like"}}, r"weights.terms=\{'behaviour': 'like'\}"),
        ({"terms": [["like"]]}, r"weights.terms\[0\]=\['like'\]"),
    ],
)
def test_scheme_values(kwargs, message):
    with pytest.raises(SchemeError, match=message):
        build_scheme(**kwargs)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("n_train", 0), ("n_val", 0), ("n_test", -3), ("n_users", 1.5), ("clickbait_share", 1.0)],
)
def test_simulator_sizes_name_their_key(field_name, value):
    with pytest.raises(ConfigError, match=rf"^data\.simulator\.{field_name}={value!r}: expected"):
        FeedSimulator(**{field_name: value})
