"""Warm start (`init_from=CKPT_URL`): every difference between the checkpoint and this run is
named before anything trains; a fitting checkpoint's weights are loaded (the first validation
after loading equals the source model's, e2e). `init_from=RUN_FOLDER`: the checkpoints the run
kept are found, the probe continues from the best-scoring one, bad input is named."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import (
    SPEC,
    TINY_TRAINED,
    train_in_process,
    trained_run,
    write_checkpoint,
)
from train import config_checks
from train.checkpoint import build_network, read
from train.data.batch import Batch
from train.data.features import FeatureSpec
from train.data.stats import TrainStats
from train.errors import ConfigError
from train.module import RankingModule
from train.warmstart import (
    Probe,
    WarmStartError,
    candidates,
    differences,
    init_from,
    logit_shift,
    pick,
)
from train.weights import WeightScheme

MODEL = {"_target_": "train.model.DNN", "_partial_": True, "hidden": [16, 8], "embedding_dim": 4}


def module_for(spec: dict, model: dict | None = None, seed: int = 1) -> RankingModule:
    """The module `python -m train` would build for this spec and model config (fresh weights)."""
    torch.manual_seed(seed)
    config = model or MODEL
    network = build_network(config, FeatureSpec(**spec), "t")
    features = FeatureSpec(**spec)
    return RankingModule(
        network,
        WeightScheme(),
        features,
        stats_of(features),
        optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    )


def stats_of(spec: FeatureSpec) -> TrainStats:
    """Training statistics of two rows: every dense feature has mean 0 and std 1, one click."""
    n = len(spec.dense)
    batch = Batch(
        categorical=torch.zeros(2, len(spec.categorical), dtype=torch.long),
        dense=torch.tensor([[-1.0] * n, [1.0] * n]),
        behaviours=torch.tensor([[0.0], [1.0]]),
        group=torch.zeros(2, dtype=torch.long),
    )
    stats = TrainStats.of(batch, spec.behaviour_names)
    assert stats.dense_mean == [0.0] * n and stats.dense_std == [1.0] * n
    return stats


def artifact(tmp_path: Path) -> dict:
    return read(str(write_checkpoint(tmp_path / "src.ckpt")))["upweight"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"categorical": {"user_id": 100, "video_id": 80, "device": 10}},
            "data.categorical.user_id: checkpoint has 50 buckets, this run 100",
        ),
        (
            {"categorical": {"user_id": 50, "video_id": 80}},
            "data.categorical.device: the checkpoint has it (10 buckets), this run does not",
        ),
        (
            {"categorical": {"user_id": 50, "video_id": 80, "device": 10, "hour": 24}},
            "data.categorical.hour: this run has it, the checkpoint does not",
        ),
        (
            {"categorical": {"video_id": 80, "user_id": 50, "device": 10}},
            "data.categorical: checkpoint has the features in the order "
            "['user_id', 'video_id', 'device'], this run ['video_id', 'user_id', 'device'] "
            "(embedding rows are laid out in that order)",
        ),
        (
            {"dense": ["video_len_s"]},
            "data.dense: checkpoint has ['video_len_s', 'user_activity'], this run ['video_len_s']",
        ),
    ],
)
def test_feature_differences_are_named(tmp_path, change, message):
    spec = FeatureSpec(**{**SPEC, **change})
    assert differences(artifact(tmp_path), spec, MODEL) == [message]


def test_model_differences_are_named_and_free_settings_allowed(tmp_path):
    saved, spec = artifact(tmp_path), FeatureSpec(**SPEC)
    assert differences(saved, spec, MODEL) == []
    free = {**MODEL, "dropout": 0.3, "sparse_embeddings": False}
    assert differences(saved, spec, free) == []
    assert differences(saved, spec, {**MODEL, "hidden": [32, 8], "activation": "gelu"}) == [
        "model.activation: checkpoint has None, this run 'gelu'",
        "model.hidden: checkpoint has [16, 8], this run [32, 8]",
    ]
    other = {**MODEL, "_target_": "train.model.MultiHead", "heads": ["click"]}
    assert differences(saved, spec, other) == [
        "model._target_: checkpoint is train.model.DNN, this run train.model.MultiHead"
    ]


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy-layout"])
def test_fitting_checkpoint_loads_weights_and_standardisation(tmp_path, legacy):
    url = str(write_checkpoint(tmp_path / "src.ckpt", seed=3, legacy=legacy))
    module = module_for(SPEC)
    summary = init_from(module, url, FeatureSpec(**SPEC), MODEL)
    assert (
        summary.startswith(f"warm start from {url}") and "optimizer and schedule fresh" in summary
    )
    state = read(url)["state_dict"]
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, state[f"model.{key}"]), key
    # Checkpoints from before train.preprocess keep the statistics under their old keys.
    mean, std = ("dense_mean", "dense_std") if legacy else ("preprocess.mean", "preprocess.std")
    assert not torch.equal(module.preprocess.mean, torch.zeros(len(SPEC["dense"])))
    assert torch.equal(module.preprocess.mean, state[mean])
    assert torch.equal(module.preprocess.std, state[std])


def test_reweighting_shifts_the_output_bias_by_the_log_odds_ratio(tmp_path):
    url = write_checkpoint(tmp_path / "src.ckpt")
    checkpoint = torch.load(url, weights_only=True)
    # click_only: positives and negatives weigh 1 (10% positives)
    checkpoint["upweight"]["stats"] |= {"weight_mean": 1.0, "positive_rate": {"click": 0.1}}
    torch.save(checkpoint, url)
    module = module_for(SPEC)
    # the new scheme: positives weigh 4 on average, negatives 1 -> mean 0.1 * 4 + 0.9 * 1
    module.artifact = {
        "model": MODEL,
        "scheme": {"label": "click", "negative_weight": 1.0},
        "stats": {"weight_mean": 1.3, "positive_rate": {"click": 0.1}},
    }
    summary = init_from(module, str(url), FeatureSpec(**SPEC), MODEL)
    assert "output bias +1.386 for the new scheme's weighted odds" in summary
    state = checkpoint["state_dict"]
    for key, value in module.model.state_dict().items():
        expected = state[f"model.{key}"] + (math.log(4.0) if key == "mlp.6.bias" else 0.0)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    # another label, or a multi-head model: no shift
    other = {**module.artifact, "scheme": {"label": "finish", "negative_weight": 1.0}}
    assert logit_shift(checkpoint["upweight"], other) == 0.0
    heads = {**module.artifact, "model": {"heads": ["click"]}}
    assert logit_shift(checkpoint["upweight"], heads) == 0.0


def test_misfit_checkpoint_is_refused_before_any_weight_changes(tmp_path):
    url = str(write_checkpoint(tmp_path / "src.ckpt"))
    spec = {**SPEC, "categorical": {"user_id": 100, "video_id": 80, "device": 10}}
    module = module_for(spec, {**MODEL, "hidden": [16]})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(WarmStartError) as info:
        init_from(module, url, FeatureSpec(**spec), {**MODEL, "hidden": [16]})
    assert str(info.value) == (
        f"init_from={url}: the checkpoint does not fit this run's model: "
        "data.categorical.user_id: checkpoint has 50 buckets, this run 100; "
        "model.hidden: checkpoint has [16, 8], this run [16]"
    )
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_unusable_sources_are_named(tmp_path):
    module, spec = module_for(SPEC), FeatureSpec(**SPEC)
    url = str(write_checkpoint(tmp_path / "src.ckpt"))
    # Resuming and warm-starting at once is a contradiction of the job's config.
    both = {"init_from": url, "ckpt_path": "last.ckpt", "paths": {"output_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"ckpt_path=last\.ckpt are both set"):
        config_checks.check(both)
    config_checks.check({**both, "ckpt_path": None})
    with pytest.raises(WarmStartError, match=r"^init_from=.*nothing.ckpt: no such file"):
        init_from(module, str(tmp_path / "nothing.ckpt"), spec, MODEL)
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(
        WarmStartError, match=r"^init_from=.*plain.ckpt: not an upweight checkpoint: no 'upweight'"
    ):
        init_from(module, str(tmp_path / "plain.ckpt"), spec, MODEL)


# --------------------------------------------------------------------------------------------
# through `python -m train` (e2e)
# --------------------------------------------------------------------------------------------


def train(output_dir: Path, *overrides: str) -> None:
    """A tiny run in this process, with the source run's settings (TINY_TRAINED)."""
    train_in_process(*TINY_TRAINED, *overrides, output_dir=output_dir)


@pytest.mark.e2e
def test_first_validation_after_loading_equals_the_source_models(
    tmp_path_factory, tmp_path, capsys
):
    source = trained_run(tmp_path_factory)
    capsys.readouterr()
    train(
        tmp_path / "warm",
        f"init_from={source}/checkpoints/best.ckpt",
        "trainer.limit_train_batches=0",  # nothing trained: validate the loaded weights
    )
    assert f"warm start from {source}/checkpoints/best.ckpt" in capsys.readouterr().out
    theirs = json.loads((source / "metrics.json").read_text())
    ours = json.loads((tmp_path / "warm" / "metrics.json").read_text())
    val = sorted(k for k in theirs if k.startswith("val/"))
    assert len(val) >= 16 and val == sorted(k for k in ours if k.startswith("val/"))
    assert {k: ours[k] for k in val} == {k: theirs[k] for k in val}


@pytest.mark.e2e
def test_incompatible_checkpoint_fails_before_writing(tmp_path_factory, tmp_path, zygote):
    source = trained_run(tmp_path_factory)
    done = zygote.run(
        *TINY_TRAINED,
        f"init_from={source}/checkpoints/best.ckpt",
        "data.categorical=[{user_id: 500, video_id: 2000, author_id: 200, category: 100, hour: 24, device: 10}]",
        f"paths.output_dir={tmp_path}/warm",
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert "data.categorical.user_id: checkpoint has 1000 buckets, this run 500" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "warm").exists()


@pytest.mark.e2e
def test_every_run_keeps_its_first_epoch_model_to_warm_start_from(tmp_path):
    run = tmp_path / "run"
    train(run, "trainer.max_epochs=3", "callbacks.early_stopping=null")
    first = read(str(run / "checkpoints" / "first_epoch.ckpt"))
    last = read(str(run / "checkpoints" / "last.ckpt"))
    assert first["epoch"] == 0 and 3 * first["global_step"] == last["global_step"] > 0
    assert "optimizer_states" not in first  # weights only: a third of a full checkpoint
    weights = [k for k in first["state_dict"] if k.startswith("model.")]
    assert any(not torch.equal(first["state_dict"][k], last["state_dict"][k]) for k in weights)

    # The warm start's first validation is the one logged after the source's first epoch.
    warm = tmp_path / "warm"
    train(warm, f"init_from={run}/checkpoints/first_epoch.ckpt", "trainer.limit_train_batches=0")
    with open(run / "logs" / "metrics.csv") as file:
        logged = next(r for r in csv.DictReader(file) if r.get("val/click/auc"))
    assert int(logged["step"]) == first["global_step"] - 1
    ours = json.loads((warm / "metrics.json").read_text())
    for key in ("val/click/auc", "val/finish/auc", "val/like/auc", "val/watch_time/xauc"):
        assert ours[key] == pytest.approx(float(logged[key]), abs=1e-6), key


@pytest.mark.e2e
def test_a_resumed_run_keeps_the_first_epoch_model(tmp_path):
    run = tmp_path / "run"
    train(run)  # one epoch
    steps = read(str(run / "checkpoints" / "last.ckpt"))["global_step"]
    # best.ckpt is written at the same validation as first_epoch.ckpt, before it: a checkpoint
    # callback going by its own restored state would save again after the second epoch.
    train(run, "trainer.max_epochs=2", f"ckpt_path={run}/checkpoints/best.ckpt")
    assert read(str(run / "checkpoints" / "last.ckpt"))["global_step"] == 2 * steps
    assert read(str(run / "checkpoints" / "first_epoch.ckpt"))["global_step"] == steps


# --------------------------------------------------------------------------------------------
# init_from=RUN_FOLDER: the candidates, the probe's pick, the warm-start schedule
# --------------------------------------------------------------------------------------------


def test_a_run_folder_names_the_checkpoints_it_kept(tmp_path_factory, tmp_path):
    source = trained_run(tmp_path_factory)
    kept = [str(source / "checkpoints" / f"{n}.ckpt") for n in ("first_epoch", "best", "last")]
    assert candidates(str(source)) == kept
    assert candidates(str(source / "checkpoints")) == kept  # its checkpoints folder
    assert candidates(f"file://{source}") == [f"file://{k}" for k in kept]  # an fsspec URL
    assert candidates(kept[1]) == [kept[1]]  # a checkpoint file: that one
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(WarmStartError, match=r"^init_from=.*empty: a folder without checkpoints"):
        candidates(str(tmp_path / "empty"))


def test_the_pick_is_the_best_probe_score_in_the_monitors_direction():
    probes = [Probe("a", 1, 0.61), Probe("b", 2, 0.64), Probe("c", 3, float("nan"))]
    assert pick(probes, "max") == "b"
    assert pick(probes[:2], "min") == "a"
    assert pick([Probe("a", 1, 0.6), Probe("b", 2, 0.6)], "max") == "a"  # the first of equals


@pytest.mark.e2e
def test_the_probe_continues_from_the_better_checkpoint(tmp_path_factory, tmp_path, capsys):
    source = trained_run(tmp_path_factory)
    folder = tmp_path / "source" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(source / "checkpoints" / "best.ckpt", folder / "best.ckpt")
    # first_epoch.ckpt (probed first): the trained model with its weights replaced by noise,
    # clearly worse after a few steps whatever the seed.
    bad = torch.load(source / "checkpoints" / "best.ckpt", weights_only=True)
    torch.manual_seed(0)
    for key, value in bad["state_dict"].items():
        if key.startswith("model.") and value.is_floating_point():
            bad["state_dict"][key] = 3 * torch.randn_like(value)
    bad["global_step"] = 1
    torch.save(bad, folder / "first_epoch.ckpt")
    capsys.readouterr()
    train(
        tmp_path / "warm",
        f"init_from={tmp_path / 'source'}",
        "init_probe_steps=3",
        "trainer.max_steps=4",
    )
    out = capsys.readouterr().out
    assert "warm-start candidates, val/click/auc after 3 probe steps each:" in out
    rows = [line for line in out.splitlines() if ".ckpt  (step " in line]
    assert len(rows) == 2 and "first_epoch.ckpt  (step 1)" in rows[0]
    assert rows[1].endswith("<- continued from") and "best.ckpt" in rows[1]
    assert f"warm start from {folder / 'best.ckpt'}" in out
    # The warm-start schedule by default, recorded in the run's config; the budget in steps.
    config = OmegaConf.load(tmp_path / "warm" / "config.yaml")
    assert config.scheduler == {"_target_": "train.optim.cosine", "warmup_steps": 8, "floor": 0.1}
    assert config.optimizer.lr == 0.003 and config.callbacks.early_stopping is None
    assert config.trainer.max_epochs == -1
    assert read(str(tmp_path / "warm" / "checkpoints" / "last.ckpt"))["global_step"] == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("init_probe_steps=0", "error: init_probe_steps=0: expected an integer >= 1"),
        ("init_schedule.lr=-1", "error: init_schedule.lr=-1: expected a finite number > 0"),
        ("init_from=EMPTY", "error: init_from=EMPTY: a folder without checkpoints"),
    ],
)
def test_bad_warm_start_input_names_the_key(tmp_path, override, message):
    (tmp_path / "empty").mkdir()
    override = override.replace("EMPTY", str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as info:
        train(tmp_path / "run", "init_from=" + str(tmp_path / "empty"), override)
    assert str(info.value).startswith(message.replace("EMPTY", str(tmp_path / "empty")))
    assert not (tmp_path / "run").exists()
