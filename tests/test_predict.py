"""Batch prediction (`python -m train.predict`): scores equal training's, any input layout,
several processes, multi-head outputs, and clear refusals that keep earlier outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hydra.utils import instantiate
from sklearn.metrics import roc_auc_score
from torch import nn

from tests.helpers import scalars, trained_run, write_checkpoint
from train.checkpoint import CheckpointError, load
from train.data.features import DataError, model_inputs
from train.data.io import TableFormat
from train.data.stats import TrainStats
from train.model import DNN
from train.module import RankingModule
from train.predict import Piece, PredictError, predict, read_batches
from train.weights import build_scheme

LABELS = ["click", "finish", "like", "watch_s", "p_click", "p_finish", "p_like", "e_watch_s"]


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


def simulated(run: Path, split: str) -> pa.Table:
    """The very rows the run was trained and evaluated on (same simulator, same seed)."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    return instantiate(config["data"]["simulator"]).table(split)


def rows(n: int, seed: int = 0) -> pa.Table:
    """Raw rows for the `helpers.SPEC` checkpoints: int, string and null ids, NaN dense."""
    rng = np.random.default_rng(seed)
    user = pa.array(
        [None if i % 11 == 0 else int(v) for i, v in enumerate(rng.integers(0, 999, n))]
    )
    device = pa.array([["ios", "android", "wéb", None][i % 4] for i in range(n)])
    length = rng.normal(15, 3, n).astype(np.float32)
    length[::7] = np.nan
    return pa.table(
        {
            "row": np.arange(n),
            "user_id": user,
            "video_id": rng.integers(-(2**40), 2**40, n),
            "device": device,
            "video_len_s": length,
            "user_activity": rng.normal(size=n).astype(np.float32),
        }
    )


@pytest.mark.e2e
def test_scores_reproduce_the_runs_test_metrics(run, tmp_path):
    # Hashing, dense fill + standardisation and weights all as in training: the run's own
    # test AUC and logloss come back from the predicted scores, to float rounding.
    table = simulated(run, "test")
    data = tmp_path / "test.parquet"
    pq.write_table(table.drop_columns(LABELS), data)  # behaviours are not needed to score
    out = tmp_path / "scores.parquet"
    summary = predict(
        str(run / "checkpoints" / "best.ckpt"), str(data), str(out), keep=["user_id", "video_id"]
    )
    scores = pq.read_table(out)
    assert summary.rows == table.num_rows == scores.num_rows
    assert scores.column_names == ["user_id", "video_id", "score", "p_calibrated"]
    assert scores.column("user_id").equals(table.column("user_id"))
    metrics = json.loads((run / "metrics.json").read_text())
    p = scores.column("score").to_numpy().astype(np.float64)
    click = table.column("click").to_numpy() > 0
    assert roc_auc_score(click, p) == pytest.approx(metrics["test/click/auc"], abs=1e-6)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    logloss = -np.where(click, np.log(q), np.log1p(-q)).mean()
    assert logloss == pytest.approx(metrics["test/click/logloss"], abs=1e-6)
    # The odds correction fitted on val travels in the checkpoint: the run's corrected test
    # calibration comes back, and the ranking is the score's.
    calibrated = scores.column("p_calibrated").to_numpy().astype(np.float64)
    assert calibrated.mean() / click.mean() == pytest.approx(
        metrics["test/click/calibration_corrected"], abs=1e-5
    )
    # (to float32 rounding: the shifted probabilities tie where the scores did not, and back)
    assert roc_auc_score(click, calibrated) == pytest.approx(roc_auc_score(click, p), abs=1e-5)


@pytest.mark.e2e
def test_checkpoint_scorer_equals_the_training_module_forward(run):
    # Rebuilt without Lightning or Hydra, the scorer is RankingModule.forward, bit for bit.
    path = run / "checkpoints" / "last.ckpt"
    checkpoint = load(str(path))
    spec, stats = checkpoint.spec, checkpoint.artifact["stats"]
    config = {k: v for k, v in checkpoint.artifact["model"].items() if not k.startswith("_")}
    fresh = {**stats, "dense_mean": [0.0] * len(spec.dense), "dense_std": [1.0] * len(spec.dense)}
    module = RankingModule(
        DNN(spec.cardinalities, len(spec.dense), **config),
        build_scheme(label="click"),
        spec,
        TrainStats.from_dict(fresh),  # dense statistics overwritten by the checkpoint's buffers
        optimizer=lambda model: None,  # type: ignore[arg-type,return-value]
    )
    module.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    assert torch.equal(module.preprocess.mean, torch.tensor(stats["dense_mean"]))
    categorical, dense, _ = model_inputs(simulated(run, "val").slice(0, 2000), spec, "val")
    assert torch.isnan(dense).any(), "the fill is part of what is compared"
    with torch.no_grad():
        expected = torch.sigmoid(module.eval()(categorical, dense))
        got = checkpoint.scorer(categorical, dense)
    assert got.shape == (2000, 2) and checkpoint.scorer.outputs == ["score", "p_calibrated"]
    torch.testing.assert_close(got[:, 0], expected, rtol=0, atol=0)
    factor = checkpoint.scorer.correction.odds_factor
    odds = expected.double() / (1 - expected.double()) / factor
    torch.testing.assert_close(got[:, 1].double(), odds / (1 + odds), rtol=0, atol=1e-6)


def test_csv_parquet_folders_and_processes_score_every_row_once(tmp_path):
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt")
    table = rows(3000)
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(table.slice(0, 1000), folder / "a.parquet", row_group_size=300)
    pq.write_table(table.slice(1000, 1000), folder / "b.parquet", row_group_size=1000)
    pacsv.write_csv(scalars(table.slice(2000)), folder / "c.csv")
    reference = predict(str(ckpt), str(folder), str(tmp_path / "one.parquet"), keep=["row"])
    assert reference.rows == 3000
    single = pq.read_table(tmp_path / "one.parquet")
    assert single.column("row").to_pylist() == list(range(3000))

    # A process that fails (a dense column of strings in the last file) fails the job and
    # leaves nothing that could pass for a result.
    broken = tmp_path / "broken"
    broken.mkdir()
    pq.write_table(table.slice(0, 1000), broken / "a.parquet")
    bad = table.slice(1000).set_column(4, "video_len_s", pa.array(["?"] * 2000))
    pq.write_table(bad, broken / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: dense column 'video_len_s' has type string"):
        predict(str(ckpt), str(broken), str(tmp_path / "failed"), procs=2)
    assert not (tmp_path / "failed").exists()

    out = tmp_path / "parts"
    summary = predict(
        str(ckpt), str(folder), str(out), keep=["row", "device"], procs=2, batch_size=128
    )
    parts = sorted(out.glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet"]
    assert summary.rows == 3000 and not list(out.glob("*.tmp"))
    merged = pa.concat_tables([pq.read_table(p) for p in parts])
    # Parts in name order hold the input in input order: each row scored exactly once.
    assert merged.column("row").to_pylist() == list(range(3000))
    assert merged.column("device")[:2000].equals(table.column("device")[:2000])
    np.testing.assert_allclose(
        merged.column("score").to_numpy(), single.column("score").to_numpy(), atol=1e-6
    )
    # CSV reads integer ids with gaps, strings and dense values into the same buckets and
    # inputs as Parquet. (A null *string* is written to CSV as "" and read back as the string
    # "", not as a null, in training as here: those rows are left out of the comparison.)
    assert predict(str(ckpt), str(folder / "c.csv"), str(tmp_path / "csv.parquet")).rows == 1000
    pq.write_table(table.slice(2000), tmp_path / "c.parquet")
    predict(str(ckpt), str(tmp_path / "c.parquet"), str(tmp_path / "pq.parquet"))
    known = table.slice(2000).column("device").is_valid().to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(
        pq.read_table(tmp_path / "csv.parquet").column("score").to_numpy()[known],
        pq.read_table(tmp_path / "pq.parquet").column("score").to_numpy()[known],
    )


def test_batches_are_bounded_and_cover_the_file(tmp_path):
    table = rows(2500)
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=1000)
    pacsv.write_csv(scalars(table), tmp_path / "x.csv")
    for name in ("x.parquet", "x.csv"):
        sizes = [
            t.num_rows
            for t in read_batches(
                Piece(str(tmp_path / name)), ["row", "user_id"], TableFormat(), {}, 300
            )
        ]
        assert sum(sizes) == 2500 and max(sizes) == 300, name
    groups = [
        t.column("row").to_pylist()
        for t in read_batches(
            Piece(str(tmp_path / "x.parquet"), (2,)), ["row"], TableFormat(), {}, 10_000
        )
    ]
    assert groups == [list(range(2000, 2500))]


class TwoHeads(nn.Module):
    """A stand-in multi-head network: [rows, 2] logits, named heads, its own ranking score."""

    heads = ("click", "like")

    def __init__(self, cardinalities, num_dense, embedding_dim=4, hidden=(8,)) -> None:
        super().__init__()
        self.embedding = nn.Embedding(sum(cardinalities), embedding_dim)
        self.offsets = torch.tensor([0, *cardinalities[:-1]]).cumsum(0)
        self.out = nn.Linear(len(cardinalities) * embedding_dim + num_dense, 2)

    def forward(self, categorical, dense):
        x = self.embedding(categorical + self.offsets).flatten(1)
        return self.out(torch.cat([x, dense], dim=1))

    def score(self, logits):
        return torch.sigmoid(logits).prod(dim=1)


def test_multi_head_models_get_one_column_per_head(tmp_path):
    ckpt = write_checkpoint(tmp_path / "heads.ckpt", target="tests.test_predict.TwoHeads")
    pq.write_table(rows(500), tmp_path / "x.parquet")
    with pytest.raises(CheckpointError, match="not in a trusted package"):
        predict(str(ckpt), str(tmp_path / "x.parquet"), str(tmp_path / "refused.parquet"))
    assert not (tmp_path / "refused.parquet").exists()
    predict(
        str(ckpt),
        str(tmp_path / "x.parquet"),
        str(tmp_path / "out.parquet"),
        keep=["row"],
        trusted_models=["tests"],
    )
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column_names == ["row", "score", "p_click", "p_like"]
    p_click, p_like = out.column("p_click").to_numpy(), out.column("p_like").to_numpy()
    np.testing.assert_allclose(out.column("score").to_numpy(), p_click * p_like, rtol=1e-6)
    assert p_click.min() > 0 and p_like.max() < 1 and not np.allclose(p_click, p_like)


def test_refusals_name_the_problem_and_keep_earlier_outputs(tmp_path):
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt")
    data = tmp_path / "x.parquet"
    pq.write_table(rows(100), data)
    out = tmp_path / "scores.parquet"
    predict(str(ckpt), str(data), str(out))
    before = out.read_bytes()

    with pytest.raises(PredictError, match="exists; pass overwrite=true"):
        predict(str(ckpt), str(data), str(out))
    pq.write_table(rows(100).drop_columns(["device"]), tmp_path / "no_device.parquet")
    with pytest.raises(DataError, match=r"no_device.parquet: missing column\(s\) \['device'\]"):
        predict(str(ckpt), str(tmp_path / "no_device.parquet"), str(out), overwrite=True)
    with pytest.raises(DataError, match=r"missing column\(s\) \['session'\]"):
        predict(str(ckpt), str(data), str(tmp_path / "k.parquet"), keep=["session"])
    with pytest.raises(PredictError, match="names one file; with procs=2 give a folder"):
        predict(str(ckpt), [str(data), str(data)], str(tmp_path / "p.parquet"), procs=2)
    with pytest.raises(PredictError, match=r"keep=.*not .*score"):
        predict(str(ckpt), str(data), str(tmp_path / "s.parquet"), keep=["score"])
    bad = rows(100).set_column(4, "video_len_s", pa.array(["x"] * 100))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="dense column 'video_len_s' has type string"):
        predict(str(ckpt), str(tmp_path / "bad.parquet"), str(tmp_path / "b"))
    assert out.read_bytes() == before  # the failed overwrite left the earlier scores intact
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob("*.tmp"))

    folder = tmp_path / "parts"
    predict(str(ckpt), str(data), str(folder))
    with pytest.raises(PredictError, match="not empty; pass overwrite=true"):
        predict(str(ckpt), str(data), str(folder))
    assert [p.name for p in folder.iterdir()] == ["part-00000.parquet"]


def test_bad_checkpoints_fail_before_anything_is_written(tmp_path):
    data = tmp_path / "x.parquet"
    pq.write_table(rows(50), data)
    cases = {
        "missing.ckpt": (None, "no such file"),
        "trunc.ckpt": ("truncated", "not a complete torch checkpoint"),
        "plain.ckpt": ({"state_dict": {}}, "not an upweight checkpoint"),
        "shape.ckpt": ("shape", r"model\.embeddings\.table\.weight has shape \[140, 4\]"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content == "truncated":
            full = write_checkpoint(tmp_path / "full.ckpt").read_bytes()
            path.write_bytes(full[: len(full) // 2])
        elif content == "shape":
            write_checkpoint(path)
            saved = torch.load(path, weights_only=True)
            saved["upweight"]["model"]["embedding_dim"] = 8
            torch.save(saved, path)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(CheckpointError, match=message):
            predict(str(path), str(data), str(tmp_path / f"{name}.out"))
        assert not (tmp_path / f"{name}.out").exists()


@pytest.mark.e2e
def test_command_line(run, tmp_path, zygote):
    data = tmp_path / "val.csv"
    pacsv.write_csv(scalars(simulated(run, "val").slice(0, 1500)), data)  # two batches of 1000
    ckpt = f"ckpt={run}/checkpoints/best.ckpt"
    done = zygote.run(
        ckpt,
        f"data.test={data}",
        f"out={tmp_path}/out",
        "keep=[user_id]",
        "batch_size=1000",
        cwd=tmp_path,
        module="train.predict",
        timeout=300,
        check=True,
    )
    assert "scored 1500 rows from 1 file(s)" in done.stdout
    assert pq.read_table(tmp_path / "out").num_rows == 1500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "val.csv"]  # nothing of Hydra's
    failed = zygote.run(
        ckpt,
        f"data.test={tmp_path}/nothing.csv",
        f"out={tmp_path}/out2",
        cwd=tmp_path,
        module="train.predict",
        timeout=300,
    )
    assert failed.returncode == 1
    assert "error: " in failed.stderr and "nothing.csv: no such file" in failed.stderr
    assert "Traceback" not in failed.stderr
