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
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import run_job, trained_run, write_checkpoint
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
def test_artifact_scores_raw_rows_like_the_checkpoint(tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory)
    ckpt = run / "checkpoints" / "best.ckpt"
    done = run_job(
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
    expected = pq.read_table(tmp_path / "scores.parquet")["score"].to_numpy()

    served = serve_isolated(artifact, json_lines(raw), tmp_path)
    assert served.returncode == 0, served.stderr[-3000:]
    got = np.array([json.loads(line)["score"] for line in served.stdout.splitlines()])
    assert got.shape == (n,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # Types matter, as in training: the same rows with int video ids score differently.
    assert not np.allclose(serve.Model.load(artifact).score_rows(table.to_pylist())["score"], got)

    spec = json.loads((artifact / "feature_spec.json").read_text())
    checkpoint = load(str(ckpt))
    assert [c["name"] for c in spec["categorical"]] == list(checkpoint.spec.categorical)
    assert [c["buckets"] for c in spec["categorical"]] == checkpoint.spec.cardinalities
    assert [d["mean"] for d in spec["dense"]] == checkpoint.scorer.preprocess.mean.tolist()
    assert [d["std"] for d in spec["dense"]] == checkpoint.scorer.preprocess.std.tolist()
    assert spec["dense_fill"] == "mean" and spec["null_bucket"] == 0
    assert spec["scheme"]["name"] == "engagement" and spec["outputs"] == ["score"]
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
