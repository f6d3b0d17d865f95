"""Training, prediction and export preprocess alike: the same raw Parquet rows (string and int
ids, nulls, NaN dense values) become the same model inputs in training (`featurize`) and in
prediction (`model_inputs`), and the training module, the checkpoint's scorer, batch
prediction, the exported program and serve.py's raw-row path all give the same probabilities,
for every dense fill. Checkpoints written before `train.preprocess` (dense statistics under
`dense_mean`/`dense_std`, the fill beside the spec) load and score the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from train import serve
from train.checkpoint import load
from train.data.features import FeatureSpec, featurize, model_inputs
from train.data.stats import TrainStats
from train.data.synthetic import FeedSimulator
from train.export import build
from train.layout import ARTIFACT_KEY
from train.model import DNN, MultiHead
from train.module import RankingModule
from train.optim import SparseDenseAdam
from train.predict import predict
from train.preprocess import DensePreprocess
from train.weights import build_scheme

ROLES = {
    "categorical": {"user_id": 1000, "video_id": 2000, "author_id": 200, "device": 10},
    "dense": ["video_len_s", "video_age_days", "author_followers_log"],
    "behaviours": {"click": "click", "like": "like"},
    "group_key": "user_id",
}
MODELS = {
    "dnn": {"_target_": "train.model.DNN", "_partial_": True, "hidden": [16, 8]},
    "multihead": {
        "_target_": "train.model.MultiHead",
        "_partial_": True,
        "heads": ["click", "like"],
        "fusion": {"click": 1.0, "like": 0.5},
        "hidden": [16],
        "head_hidden": [8],
    },
}
CLASSES = {"train.model.DNN": DNN, "train.model.MultiHead": MultiHead}


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> Path:
    """Simulated impressions as a real Parquet file in the shapes raw data comes in: string
    video ids (non-ASCII too), int user ids with nulls, string devices with nulls, NaN and
    null dense values, several row groups."""
    table = FeedSimulator(
        n_train=1500, n_val=10, n_test=10, n_users=80, n_videos=150, n_authors=30
    ).table("train")
    n = table.num_rows

    def replace(name: str, values: list, kind: pa.DataType | None = None) -> None:
        nonlocal table
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pa.array(values, kind))

    replace("video_id", [f"vidéo-{v}" for v in table["video_id"].to_pylist()])
    replace(
        "user_id", [None if i % 9 == 0 else u for i, u in enumerate(table["user_id"].to_pylist())]
    )
    replace(
        "device", [None if i % 13 == 0 else d for i, d in enumerate(table["device"].to_pylist())]
    )
    length = table["video_len_s"].to_numpy().copy()
    length[::7] = np.nan  # NaN ...
    replace("video_len_s", length)
    followers = table["author_followers_log"].to_pylist()
    replace(
        "author_followers_log",
        [None if i % 5 == 0 else f for i, f in enumerate(followers)],
        pa.float32(),
    )  # ... and null
    path = tmp_path_factory.mktemp("rows") / "rows.parquet"
    pq.write_table(table, path, row_group_size=400)
    assert n == 1500
    return path


def read(path: Path) -> pa.Table:
    return pq.read_table(path)


def spec_for(fill: str) -> FeatureSpec:
    return FeatureSpec(**ROLES, dense_fill=fill)


def test_training_and_prediction_featurise_identically(parquet):
    table = read(parquet)
    assert table["video_id"].type == pa.string() and table["user_id"].null_count > 0
    assert pc.sum(pc.is_nan(table["video_len_s"])).as_py() > 0
    assert table["author_followers_log"].null_count > 0
    spec = spec_for("mean")
    batch = featurize(table, spec, "rows")
    categorical, dense, _ = model_inputs(table, spec, "rows")
    assert categorical.dtype == batch.categorical.dtype == torch.int64
    assert dense.dtype == batch.dense.dtype == torch.float32
    assert torch.equal(categorical, batch.categorical)
    # NaN stays NaN in both (the model fills it), in the same places, nulls included.
    torch.testing.assert_close(dense, batch.dense, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(dense[::7, 0]).all() and torch.isnan(dense[::5, 2]).all()  # NaN, null
    assert not torch.isnan(dense[:, 0]).all()
    # Null ids go to bucket 0, every other id to 1..n-1.
    assert (categorical[::9, 0] == 0).all() and (categorical[1::9, 0] > 0).all()
    # The prediction path reads only the model's columns: behaviours are not needed.
    slim = table.select([*spec.categorical, *spec.dense])
    slim_categorical, slim_dense, _ = model_inputs(slim, spec, "rows")
    assert torch.equal(slim_categorical, categorical)
    torch.testing.assert_close(slim_dense, dense, rtol=0, atol=0, equal_nan=True)


def train_module(table: pa.Table, fill: str, model: str, seed: int = 0) -> RankingModule:
    """The module `python -m train` builds on these rows (fresh weights, eval mode)."""
    spec = spec_for(fill)
    batch = featurize(table, spec, "rows")
    stats = TrainStats.of(batch, spec.behaviour_names)
    config = MODELS[model]
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    network = CLASSES[config["_target_"]](spec.cardinalities, len(spec.dense), **kwargs)
    module = RankingModule(
        network,
        build_scheme(label="click"),
        spec,
        stats,
        optimizer=SparseDenseAdam,
        model_config=config,
    )
    return module.eval()


def save(module: RankingModule, path: Path) -> Path:
    """What Lightning's checkpointing writes of the module: its state_dict, and what its
    `on_save_checkpoint` adds."""
    checkpoint = {"epoch": 0, "global_step": 0, "state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def module_probs(module: RankingModule, categorical, dense) -> torch.Tensor:
    """Training's probabilities as the scorer lays them out: [score, p_<head>...] for a
    multi-head network, [p] for a single logit."""
    with torch.no_grad():
        logits = module(categorical, dense).float()
    probs = torch.sigmoid(logits)
    if probs.dim() == 1:
        return probs.unsqueeze(1)
    return torch.cat([module.model.score(logits).unsqueeze(1), probs], dim=1)


def legacy(path: Path, target: Path) -> Path:
    """The same checkpoint in the layout written before `train.preprocess`."""
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["state_dict"]
    state["dense_mean"] = state.pop("preprocess.mean")
    state["dense_std"] = state.pop("preprocess.std")
    artifact = checkpoint[ARTIFACT_KEY]
    artifact["dense_fill"] = artifact["spec"].pop("dense_fill")
    torch.save(checkpoint, target)
    return target


@pytest.mark.parametrize("model", ["dnn", "multihead"])
@pytest.mark.parametrize("fill", ["mean", "zero"])
def test_module_scorer_predict_and_export_score_alike(parquet, tmp_path, fill, model):
    table = read(parquet)
    module = train_module(table, fill, model)
    assert module.preprocess.fill == fill
    spec = spec_for(fill)
    categorical, dense, _ = model_inputs(table, spec, "rows")
    expected = module_probs(module, categorical, dense)
    ckpt = save(module, tmp_path / "model.ckpt")

    # the checkpoint's scorer: bit for bit the training forward
    checkpoint = load(str(ckpt))
    assert checkpoint.spec == spec and checkpoint.scorer.preprocess.fill == fill
    with torch.no_grad():
        scored = checkpoint.scorer(categorical, dense)
    assert scored.shape == (1500, 3 if model == "multihead" else 1)
    torch.testing.assert_close(scored, expected, rtol=0, atol=0)

    # batch prediction from the Parquet file: the same rows, the same scores
    predict(str(ckpt), str(parquet), str(tmp_path / "scores.parquet"), batch_size=512)
    predicted = pq.read_table(tmp_path / "scores.parquet")
    assert predicted.column_names == checkpoint.scorer.outputs
    for j, name in enumerate(checkpoint.scorer.outputs):
        np.testing.assert_array_equal(predicted[name].to_numpy(), expected[:, j].numpy())

    # the exported program, reloaded as serve.py loads it, on the same tensors ...
    artifact = build(checkpoint)
    folder = tmp_path / "artifact"
    folder.mkdir()
    for name, content in artifact.files.items():
        (folder / name).write_bytes(content)
    program = serve.load_program(folder / serve.PROGRAM)
    with torch.inference_mode():
        exported = program(categorical, dense)
    torch.testing.assert_close(exported, expected, rtol=0, atol=1e-6)
    # ... and serve.py on the raw rows (its own hashing and dense parsing)
    served = serve.Model.load(folder).score_rows(table.to_pylist())
    for j, name in enumerate(checkpoint.scorer.outputs):
        np.testing.assert_allclose(served[name], expected[:, j].numpy(), rtol=0, atol=1e-6)

    # an old-layout checkpoint of the same model loads with the same fill and scores the same
    old = load(str(legacy(ckpt, tmp_path / "old.ckpt")))
    assert old.spec == spec
    with torch.no_grad():
        torch.testing.assert_close(old.scorer(categorical, dense), expected, rtol=0, atol=0)


def test_the_fill_changes_the_scores_of_missing_values_only(parquet):
    # The control of the test above: the two fills are different functions, on exactly the
    # rows with a missing dense value, so scoring with the wrong fill could not pass it.
    table = read(parquet)
    mean, zero = train_module(table, "mean", "dnn"), train_module(table, "zero", "dnn")
    assert torch.equal(mean.preprocess.mean, zero.preprocess.mean)
    categorical, dense, _ = model_inputs(table, spec_for("mean"), "rows")
    missing = torch.isnan(dense).any(1)
    a, b = module_probs(mean, categorical, dense), module_probs(zero, categorical, dense)
    assert torch.equal(a[~missing], b[~missing])
    assert (a[missing] != b[missing]).all()
    # mean fill: a missing value scores as the training mean (0 after standardising)
    filled = torch.where(torch.isnan(dense), mean.preprocess.mean, dense)
    torch.testing.assert_close(module_probs(mean, categorical, filled), a, rtol=0, atol=0)


@pytest.mark.parametrize("fill", ["mean", "zero"])
def test_an_old_layout_checkpoint_resumes_into_the_module(parquet, tmp_path, fill):
    # Lightning resumes through on_load_checkpoint + load_state_dict: the old state keys move
    # to `preprocess.*`, so the resumed module is the saved one.
    table = read(parquet)
    saved = train_module(table, fill, "dnn", seed=0)
    old = legacy(save(saved, tmp_path / "new.ckpt"), tmp_path / "old.ckpt")
    checkpoint = torch.load(old, weights_only=True)
    assert (
        "dense_mean" in checkpoint["state_dict"]
        and "dense_fill" not in checkpoint[ARTIFACT_KEY]["spec"]
    )
    resumed = train_module(table.slice(0, 100), fill, "dnn", seed=1)  # other stats and weights
    assert not torch.equal(resumed.preprocess.mean, saved.preprocess.mean)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    categorical, dense, _ = model_inputs(table, spec_for(fill), "rows")
    torch.testing.assert_close(
        module_probs(resumed, categorical, dense),
        module_probs(saved, categorical, dense),
        rtol=0,
        atol=0,
    )


def test_mean_fill_is_fill_then_standardise_exactly():
    # The module standardises first and zeroes the NaNs after: a missing value filled with the
    # mean is 0 once standardised, every other value (infinities too) is what filling first gives.
    mean, std = torch.tensor([0.5, -2.0, 1e30]), torch.tensor([3.0, 0.1, 7e29])
    nan, inf = float("nan"), float("inf")
    dense = torch.tensor(
        [[nan, 1.0, 2e30], [inf, nan, -inf], [-0.0, 3.4e38, nan], [0.5, -2.0, 1e30]]
    )
    filled = torch.where(torch.isnan(dense), mean, dense)
    expected = (filled - mean) / std
    assert torch.equal(DensePreprocess(mean, std, "mean")(dense), expected)
