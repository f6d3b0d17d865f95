"""The serving export: its serve.py, run in an isolated interpreter that cannot import this
package, pandas or Hydra, scores raw rows (string ids and nulls included) exactly as the
checkpoint does through batch prediction."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import trained_run, write_checkpoint
from tests.test_predict import rows, simulated
from train import serve
from train.checkpoint import load
from train.data.features import hash_ids
from train.export import ExportError, export
from train.predict import predict

# Run serve.py as a serving host would: no PYTHONPATH, no user site, not from the repo, and
# with this package and the training stack made unimportable.
ISOLATED = """
import importlib.abc, importlib.machinery, runpy, sys
BLOCKED = {"train", "tests", "pandas", "pyarrow", "hydra", "omegaconf", "lightning", "fsspec"}
class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # find_spec answers (torch probes optional packages with it); importing fails.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"serve.py must not need {spec.name}")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Block())
folder = sys.argv[1]
sys.argv = ["serve.py", folder]
runpy.run_path(folder + "/serve.py", run_name="__main__")
"""


def serve_isolated(artifact: Path, lines: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    host = tmp_path / "host"
    shutil.copytree(artifact, host / "artifact")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED, str(host / "artifact")],
        input="".join(lines),
        cwd=host,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def json_lines(table: pa.Table) -> list[str]:
    return [json.dumps(row) + "\n" for row in table.to_pylist()]


@pytest.mark.e2e
def test_artifact_scores_raw_rows_like_the_checkpoint(tmp_path_factory, tmp_path, zygote):
    run = trained_run(tmp_path_factory)
    ckpt = run / "checkpoints" / "best.ckpt"
    done = zygote.run(
        f"ckpt={ckpt}",
        f"out={tmp_path}/artifact",
        cwd=tmp_path,
        module="train.export",
        timeout=300,
        check=True,
    )
    assert "the program matches the checkpoint" in done.stdout
    artifact = tmp_path / "artifact"
    assert sorted(p.name for p in artifact.iterdir()) == [
        "feature_spec.json",
        "model.pt2",
        "serve.py",
    ]

    # Raw rows as a serving system sends them: string video ids (some non-ASCII), string
    # devices, null ids, null and NaN dense values.
    table = simulated(run, "test").slice(0, 600)
    n = table.num_rows
    ids = table["video_id"].to_pylist()
    video = [f"vidéo-{v}" if i % 3 else str(v) for i, v in enumerate(ids)]
    user = [None if i % 9 == 0 else u for i, u in enumerate(table["user_id"].to_pylist())]
    age = table["video_age_days"].to_pylist()
    age = [None if i % 13 == 0 else a for i, a in enumerate(age)]
    device = [None if i % 17 == 0 else d for i, d in enumerate(table["device"].to_pylist())]
    raw = (
        table.set_column(table.schema.get_field_index("video_id"), "video_id", pa.array(video))
        .set_column(table.schema.get_field_index("user_id"), "user_id", pa.array(user))
        .set_column(table.schema.get_field_index("device"), "device", pa.array(device))
        .set_column(
            table.schema.get_field_index("video_age_days"),
            "video_age_days",
            pa.array(age, pa.float32()),
        )
    )
    assert pc.sum(pc.is_nan(raw["author_followers_log"])).as_py() > 0  # NaNs as well as nulls
    pq.write_table(raw, tmp_path / "raw.parquet")
    predict(str(ckpt), str(tmp_path / "raw.parquet"), str(tmp_path / "scores.parquet"))
    predicted = pq.read_table(tmp_path / "scores.parquet")
    expected = predicted["score"].to_numpy()

    served = serve_isolated(artifact, json_lines(raw), tmp_path)
    assert served.returncode == 0, served.stderr[-3000:]
    lines = [json.loads(line) for line in served.stdout.splitlines()]
    got = np.array([line["score"] for line in lines])
    assert got.shape == (n,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # The odds correction is inside the program: serve.py's p_calibrated is predict's.
    np.testing.assert_allclose(
        [line["p_calibrated"] for line in lines],
        predicted["p_calibrated"].to_numpy(),
        rtol=0,
        atol=1e-6,
    )
    # Types matter, as in training: the same rows with int video ids score differently.
    assert not np.allclose(serve.Model.load(artifact).score_rows(table.to_pylist())["score"], got)

    spec = json.loads((artifact / "feature_spec.json").read_text())
    checkpoint = load(str(ckpt))
    assert [c["name"] for c in spec["categorical"]] == list(checkpoint.spec.categorical)
    assert [c["buckets"] for c in spec["categorical"]] == checkpoint.spec.cardinalities
    assert [d["mean"] for d in spec["dense"]] == checkpoint.scorer.preprocess.mean.tolist()
    assert [d["std"] for d in spec["dense"]] == checkpoint.scorer.preprocess.std.tolist()
    assert spec["dense_fill"] == "mean" and spec["null_bucket"] == 0
    assert spec["scheme"]["name"] == "engagement"
    assert spec["outputs"] == ["score", "p_calibrated"]
    assert spec["calibration"]["odds_factor"] == checkpoint.scorer.correction.odds_factor
    assert "0123456789123456" in spec["hashing"]["strings"]


def test_serve_py_reports_bad_input_without_a_traceback(tmp_path):
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt")
    export(str(ckpt), str(tmp_path / "artifact"))
    served = serve_isolated(
        tmp_path / "artifact",
        [
            '{"user_id": 1, "video_id": 7, "device": "ios", "video_len_s": 3, '
            '"user_activity": 1}\n',
            '{"user_id": 1, "video_id": 2.5, "device": "ios", "video_len_s": null}\n',
        ],
        tmp_path,
    )
    assert served.returncode == 1
    assert "video_id row 1: non-integral float id 2.5" in served.stderr
    assert "Traceback" not in served.stderr


def test_multi_head_export_and_in_process_serving(tmp_path):
    ckpt = write_checkpoint(tmp_path / "heads.ckpt", target="tests.test_predict.TwoHeads")
    artifact = export(str(ckpt), str(tmp_path / "artifact"), trusted_models=["tests"])
    assert artifact.max_difference <= 1e-6
    model = serve.Model.load(tmp_path / "artifact")
    assert model.outputs == ["score", "p_click", "p_like"]
    table = rows(300)
    pq.write_table(table, tmp_path / "x.parquet")
    predict(
        str(ckpt),
        str(tmp_path / "x.parquet"),
        str(tmp_path / "p.parquet"),
        trusted_models=["tests"],
    )
    expected = pq.read_table(tmp_path / "p.parquet")
    got = model.score_rows(table.to_pylist())
    for name in model.outputs:
        np.testing.assert_allclose(got[name], expected[name].to_numpy(), rtol=0, atol=1e-6)
    # A key missing from a row is a null; a column missing from every row is an error.
    some = [{k: v for k, v in r.items() if k != "device"} for r in table.slice(0, 3).to_pylist()]
    some.append(table.slice(3, 1).to_pylist()[0])
    assert model.score_rows(some)["score"].shape == (4,)
    with pytest.raises(serve.ArtifactError, match=r"no row has column\(s\) \['device'\]"):
        model.score_rows(some[:3])
    assert model.score_rows([])["score"].shape == (0,)

    # An artifact of format 1 (hashed columns only, written before vocabularies and list
    # columns) still loads and scores; an unknown format is refused.
    old = tmp_path / "format1"
    old.mkdir()
    shutil.copy(tmp_path / "artifact" / "model.pt2", old / "model.pt2")
    spec = json.loads((tmp_path / "artifact" / "feature_spec.json").read_text())
    assert spec["sequences"] == [] and all("buckets" in c for c in spec["categorical"])
    spec = {k: v for k, v in spec.items() if k not in ("sequences", "vocabulary_rule")}
    (old / "feature_spec.json").write_text(json.dumps({**spec, "format": 1}))
    np.testing.assert_array_equal(
        serve.Model.load(old).score_rows(table.to_pylist())["score"], got["score"]
    )
    (old / "feature_spec.json").write_text(json.dumps({**spec, "format": 3}))
    with pytest.raises(serve.ArtifactError, match=r"format 3; this serve\.py reads 1 or 2"):
        serve.Model.load(old)


def test_export_refuses_to_overwrite_an_artifact(tmp_path):
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt")
    export(str(ckpt), str(tmp_path / "artifact"))
    before = (tmp_path / "artifact" / "model.pt2").read_bytes()
    other = write_checkpoint(tmp_path / "other.ckpt", seed=1)
    with pytest.raises(ExportError, match="already holds an artifact"):
        export(str(other), str(tmp_path / "artifact"))
    assert (tmp_path / "artifact" / "model.pt2").read_bytes() == before
    export(str(other), str(tmp_path / "artifact"), overwrite=True)
    assert (tmp_path / "artifact" / "model.pt2").read_bytes() != before
    assert not list((tmp_path / "artifact").glob("*.tmp"))


ids = st.one_of(st.none(), st.text(max_size=40))
ints = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))


@settings(max_examples=60, deadline=None)
@given(
    strings=st.lists(ids, min_size=1, max_size=50),
    numbers=st.lists(ints, min_size=1, max_size=50),
    buckets=st.integers(2, 2**40),
)
def test_serve_hashing_is_pandas_hash_array(strings, numbers, buckets):
    # The numpy SipHash-2-4 / splitmix64 in serve.py against the training hash (pandas).
    np.testing.assert_array_equal(
        serve.hash_ids(strings, buckets), hash_ids(pa.array(strings, pa.string()), buckets)
    )
    np.testing.assert_array_equal(
        serve.hash_ids(numbers, buckets), hash_ids(pa.array(numbers, pa.int64()), buckets)
    )
    floats = np.array([np.nan if v is None else v % 2**50 for v in numbers], dtype=np.float64)
    arrow = pa.array([None if v is None else v % 2**50 for v in numbers], pa.float64())
    np.testing.assert_array_equal(serve.hash_ids(floats, buckets), hash_ids(arrow, buckets))
    assert torch.from_numpy(serve.hash_ids(strings, buckets)).max() < buckets


# -- vocabularies and list columns: serving maps ids and lists as training does ----------------

LIST_TYPES = {
    "user_id": pa.int64(),
    "video_id": pa.int64(),
    "device": pa.string(),
    "hist": pa.list_(pa.int64()),
    "tags": pa.list_(pa.string()),
    "follows": pa.list_(pa.int64()),
    "x": pa.float32(),
    "click": pa.float32(),
}
LIST_ROLES = [
    # user_id hashed; video_id (ints) and device (strings) exact vocabularies.
    "data.categorical=[{user_id: 64}, video_id, device]",
    # A list sharing the video vocabulary (attention), one with its own vocabulary of strings
    # (mean), one sharing the hashed user table (sum).
    "data.sequences={hist: {table: video_id, max_len: 5, pooling: attention}, "
    "tags: {max_len: 4, pooling: mean}, follows: {table: user_id, max_len: 3, pooling: sum}}",
    "data.min_count=2",
    "data.dense=[x]",
    "data.behaviours={click: click}",
    "data.group_key=user_id",
]


def list_feed(n: int, seed: int) -> list[dict]:
    """Impressions with int and string ids, list columns of every length (nulls among them),
    and a click that depends on the lists. Ids are Zipf-like, so some are rare."""
    rng = np.random.default_rng(seed)

    def videos(k: int) -> list[int]:
        return [int(v) for v in rng.zipf(1.3, k) % 400]

    out = []
    for i in range(n):
        hist = None if i % 13 == 0 else videos(int(rng.integers(0, 9)))
        tags = None if i % 11 == 0 else [f"t{t % 60}" for t in rng.zipf(1.5, rng.integers(0, 7))]
        follows = (
            None if i % 17 == 0 else [int(u) for u in rng.integers(0, 200, rng.integers(0, 5))]
        )
        x = None if i % 9 == 0 else float(rng.normal())
        logit = -1 + (x or 0) + 0.5 * len(hist or []) / 8 - 0.7 * ("t1" in (tags or []))
        if i % 250 == 1:  # ids seen once: rarer than min_count=2
            tags = [*(tags or []), f"once{i}"]
        out.append(
            {
                "user_id": int(rng.integers(0, 200)),
                "video_id": 1000 + i if i % 250 == 1 else videos(1)[0],
                "device": ["ios", "android", "wéb"][i % 3],
                "hist": hist,
                "tags": tags,
                "follows": follows,
                "x": x,
                "click": float(rng.random() < 1 / (1 + np.exp(-logit))),
            }
        )
    return out


def probe_rows(train: list[dict]) -> list[dict]:
    """Rows that reach every case: unseen, null and rare ids (ints and strings), empty and
    null lists, null elements, lists longer than max_len; then ordinary rows."""
    videos = [r["video_id"] for r in train] + [v for r in train for v in r["hist"] or []]
    tags = [t for r in train for t in r["tags"] or []]
    rare_video = min(set(videos), key=videos.count)
    rare_tag = min(set(tags), key=tags.count)
    assert videos.count(rare_video) == 1 and tags.count(rare_tag) == 1, "min_count=2 drops them"
    base = {"user_id": 5, "video_id": 1, "device": "ios", "x": 0.5, "click": 0.0}
    special = [
        {**base, "video_id": 10**9, "device": "tv", "hist": [10**9, 2**40], "tags": ["new"]},
        {"user_id": None, "video_id": None, "device": None, "hist": None, "tags": None,
         "follows": None, "x": None, "click": 1.0},
        {**base, "hist": [], "tags": [], "follows": []},
        {**base, "hist": list(range(12)), "tags": [f"t{i}" for i in range(9)],
         "follows": list(range(7))},
        {**base, "hist": [1, None, 2], "tags": ["t1", None], "follows": [None, 3]},
        {**base, "video_id": rare_video, "hist": [rare_video, 1], "tags": [rare_tag, "t0"]},
        {**base, "user_id": -(2**62), "follows": [2**62, -1], "device": "wéb"},
    ]  # fmt: skip
    return special + list_feed(200, seed=7)


def list_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema(LIST_TYPES))


def csv_table(table: pa.Table) -> pa.Table:
    """The table as CSV holds it: list cells joined by `|` (null and empty lists: empty)."""
    for name in ("hist", "tags", "follows"):
        at = table.schema.get_field_index(name)
        text = pc.binary_join(pc.cast(table[name], pa.list_(pa.string())), "|")
        table = table.set_column(at, name, text)
    return table


def list_checkpoint(path: Path) -> Path:
    """A random (untrained) DNN over the same kinds of columns, vocabularies included."""
    from train.data.vocabulary import Vocabulary

    vocabularies = {
        "video_id": Vocabulary(np.array([7, -3, 2**40, 0, 12]), "int", 1, 9),
        "device": Vocabulary(np.array(["ios", "wéb"], dtype=object), "string", 1, 3),
        "tags": Vocabulary(np.array(["t1", "t0", "t3"], dtype=object), "string", 1, 5),
    }
    spec = {
        "categorical": {"user_id": 64, "video_id": "vocab", "device": "vocab"},
        "dense": ["x"],
        "behaviours": {"click": "click"},
        "group_key": "user_id",
        "sequences": {
            "hist": {"table": "video_id", "max_len": 5, "pooling": "attention"},
            "tags": {"max_len": 4, "pooling": "mean"},
            "follows": {"table": "user_id", "max_len": 3, "pooling": "sum"},
        },
        "vocabularies": {t: v.state() for t, v in vocabularies.items()},
    }
    return write_checkpoint(path, spec=spec)


def test_serving_maps_ids_and_lists_as_training_does(tmp_path):
    # Without a program: the feature spec alone turns JSON rows into exactly the table rows
    # that training's `model_inputs` makes of the same rows read from Parquet.
    from train.data.features import model_inputs
    from train.export import feature_spec

    checkpoint = load(str(list_checkpoint(tmp_path / "lists.ckpt")))
    spec = json.loads(json.dumps(feature_spec(checkpoint)))
    assert spec["format"] == serve.FORMAT == 2
    assert [s["table"] for s in spec["sequences"]] == ["video_id", "tags", "user_id"]
    assert spec["sequences"][1]["vocabulary"]["ids"] == ["t1", "t0", "t3"]
    assert "vocabulary" not in spec["sequences"][0] and "buckets" not in spec["sequences"][2]
    model = serve.Model(None, spec)  # type: ignore[arg-type]
    rows = probe_rows(list_feed(300, seed=0))[:7]
    rows += [{**rows[3], "video_id": 7, "hist": [12, 0, -3, 7, 2**40, 99]}, {**rows[2], "x": 1}]
    table = list_table(rows)
    expected = model_inputs(table, checkpoint.spec, "rows")
    got = model.features(
        {c: [r.get(c) for r in json.loads(json.dumps(rows))] for c in model.columns}
    )
    assert len(got) == 3
    for served, trained in zip(got, expected, strict=True):
        torch.testing.assert_close(served, trained, rtol=0, atol=0, equal_nan=True)
    assert got[0][:, 1].tolist()[:2] == [1, 0] and got[0][7, 1] == 2  # unseen, null, 7
    # The last max_len=5 elements in order: 0, -3, 7, 2**40 (vocabulary rows 5, 3, 2, 4), 99
    # (out of vocabulary).
    assert got[2][7, :5].tolist() == [5, 3, 2, 4, 1]
    assert (got[2][2] == 0).all() and (got[2][1] == 0).all()  # empty and null lists: padding

    with pytest.raises(serve.ArtifactError, match=r"list column 'tags' row 1: str 'a\|b'; "):
        model.features(
            {**{c: [r.get(c) for r in rows[:2]] for c in model.columns}, "tags": [[], "a|b"]}
        )
    with pytest.raises(serve.ArtifactError, match=r"list column 'hist' row 0: int 7; expected a"):
        model.score_rows([{**rows[2], "hist": 7}])
    with pytest.raises(serve.ArtifactError, match=r"video_id row 1: string id '7'; .* int ids"):
        model.score_rows([rows[2], {**rows[2], "video_id": "7"}])
    with pytest.raises(serve.ArtifactError, match=r"list column 'tags' row 0: int id 3; .*string"):
        model.score_rows([{**rows[2], "tags": ["t1", 3]}])


@pytest.mark.e2e
def test_a_trained_list_model_scores_alike_everywhere(tmp_path):
    # One tiny model trained on files with vocabularies and list columns; the same rows score
    # alike through the training module's forward, predict (Parquet and CSV) and the export.
    from tests.helpers import TINY_RUN, train_in_process
    from train.data.features import featurize, model_inputs
    from train.data.stats import TrainStats
    from train.model import DNN
    from train.module import RankingModule
    from train.weights import build_scheme

    train = list_feed(3000, seed=0)
    data = tmp_path / "data"
    data.mkdir()
    for split, rows_ in (("train", train), ("val", list_feed(500, 1)), ("test", list_feed(500, 2))):
        pq.write_table(list_table(rows_), data / f"{split}.parquet")
    run = tmp_path / "run"
    train_in_process(
        *TINY_RUN,
        "data=files",
        f"data.train={data}/train.parquet",
        f"data.val={data}/val.parquet",
        f"data.test={data}/test.parquet",
        *LIST_ROLES,
        "data.batch_size=512",
        "trainer.max_epochs=1",
        "trainer.num_sanity_val_steps=0",
        output_dir=run,
    )
    ckpt = str(run / "checkpoints" / "last.ckpt")
    checkpoint = load(ckpt)
    spec = checkpoint.spec
    assert set(spec.vocabularies) == {"video_id", "device", "tags"}
    probe = probe_rows(train)
    table = list_table(probe)

    # (a) The training module's own forward on featurised rows.
    config = {k: v for k, v in checkpoint.artifact["model"].items() if not k.startswith("_")}
    module = RankingModule(
        DNN(spec.cardinalities, len(spec.dense), **spec.network_options, **config),
        build_scheme(label="click"),
        spec,
        TrainStats.from_dict(checkpoint.artifact["stats"]),
        optimizer=lambda model: None,  # type: ignore[arg-type,return-value]
    )
    module.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    batch = featurize(table, spec, "probe")
    with torch.no_grad():
        trained = torch.sigmoid(module.eval()(batch.categorical, batch.dense, batch.sequences))

    # (b) predict from Parquet, and from CSV (list cells split by `|`).
    pq.write_table(table.drop_columns(["click"]), tmp_path / "probe.parquet")
    predict(ckpt, str(tmp_path / "probe.parquet"), str(tmp_path / "pq.parquet"))
    from_parquet = pq.read_table(tmp_path / "pq.parquet")["score"].to_numpy()
    np.testing.assert_allclose(from_parquet, trained.numpy(), rtol=0, atol=1e-6)
    pacsv.write_csv(csv_table(table), tmp_path / "probe.csv")
    predict(ckpt, str(tmp_path / "probe.csv"), str(tmp_path / "csv.parquet"))
    from_csv = pq.read_table(tmp_path / "csv.parquet")["score"].to_numpy()
    # CSV cannot hold a null string (it reads back as "") nor a null list element.
    representable = [
        r["device"] is not None
        and all(None not in (r.get(c) or []) for c in ("hist", "tags", "follows"))
        for r in probe
    ]
    assert sum(representable) > len(probe) - 20
    np.testing.assert_allclose(from_csv[representable], from_parquet[representable], atol=1e-6)

    # (c) the exported program through serve.py, from JSON rows.
    artifact = export(ckpt, str(tmp_path / "artifact"))
    assert artifact.max_difference <= 1e-5
    model = serve.Model.load(tmp_path / "artifact")
    rows_ = json.loads(json.dumps([{k: v for k, v in r.items() if v is not None} for r in probe]))
    served = model.score_rows(rows_)["score"]
    np.testing.assert_allclose(served, from_parquet, rtol=0, atol=1e-5)
    columns = {c: [r.get(c) for r in rows_] for c in model.columns}
    for got, expected in zip(model.features(columns), model_inputs(table, spec, "p"), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    # The lists count: without them the same rows score otherwise.
    bare = model.score_rows([{**r, "hist": []} for r in rows_[:50]])
    assert not np.allclose(bare["score"], served[:50], rtol=0, atol=1e-7)
