"""`compile=tower`: the compiled dense tower trains as the eager one does (50 steps of the job's
RankingModule + lightning.Trainer, losses and final weights within a bound), and a checkpoint of
a compiled run loads into an eager network, scores and exports like any other."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers import compose, quiet_trainer
from train import config_checks
from train.checkpoint import load
from train.compile import CompileTower, tower_parts
from train.data.module import ImpressionDataModule
from train.data.synthetic import FeedSimulator
from train.errors import ConfigError
from train.export import build
from train.model import DNN, MultiHead
from train.module import RankingModule
from train.optim import SparseDenseAdam
from train.weights import build_scheme

STEPS = 50
BATCH = 256
MODEL = {"_target_": "train.model.DNN", "_partial_": True, "embedding_dim": 8, "hidden": [32, 16]}
# Measured (torch 2.13 CPU, inductor + gcc): losses within 6e-8 over the 50 steps, final weights
# within 1.5e-8 (float32 rounding of the fused kernels). The bounds leave room for other CPUs'
# kernels; a wrong gradient or a skipped update is off by 1e-4 or more within a few steps.
LOSS_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 1e-6


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def data_module() -> ImpressionDataModule:
    # STEPS full batches and no more: one batch shape, so one compilation keeps the test short.
    data = ImpressionDataModule(
        categorical={"user_id": 1000, "video_id": 2000, "author_id": 200, "device": 10},
        dense=["video_len_s", "user_activity", "video_age_days"],
        behaviours={"click": "click", "finish": "finish", "watch_time": "watch_s"},
        group_key="user_id",
        simulator=FeedSimulator(
            n_train=STEPS * BATCH, n_val=256, n_test=256, n_users=500, n_videos=1000, n_authors=100
        ),
        batch_size=BATCH,
    )
    data.prepare(scheme())
    return data


def scheme():
    terms = [{"behaviour": "click", "coef": 1}, {"behaviour": "finish", "coef": 3}]
    return build_scheme(label="click", terms=terms)


def fit(data: ImpressionDataModule, compiled: bool) -> tuple[RankingModule, L.Trainer, Losses]:
    torch.manual_seed(0)
    network = DNN(data.spec.cardinalities, len(data.spec.dense), embedding_dim=8, hidden=(32, 16))
    module = RankingModule(
        network, scheme(), data.spec, data.stats, optimizer=SparseDenseAdam, model_config=MODEL
    )
    losses = Losses()
    callbacks: list[L.Callback] = [losses, *([CompileTower()] if compiled else [])]
    trainer = quiet_trainer(
        accelerator="cpu",
        max_steps=STEPS,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data)
    return module, trainer, losses


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[RankingModule, L.Trainer, Losses]]:
    data = data_module()
    eager = fit(data, compiled=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = fit(data, compiled=True)
    # Not a silent eager run (nn.Module.compile() is one for nn.Sequential in torch 2.13).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    return {"eager": eager, "compiled": compiled}


@pytest.mark.slow
def test_compiled_tower_trains_as_the_eager_one(runs):
    (eager, _, eager_losses), (compiled, _, compiled_losses) = runs["eager"], runs["compiled"]
    assert len(eager_losses.values) == len(compiled_losses.values) == STEPS
    loss_gap = max(
        abs(a - b) for a, b in zip(eager_losses.values, compiled_losses.values, strict=True)
    )
    assert loss_gap < LOSS_TOLERANCE
    # The same names (the compiled parts are the modules themselves), the same values.
    eager_state, compiled_state = eager.state_dict(), compiled.state_dict()
    assert list(compiled_state) == list(eager_state)
    weight_gap = max(
        (compiled_state[k].float() - eager_state[k].float()).abs().max().item() for k in eager_state
    )
    assert weight_gap < WEIGHT_TOLERANCE
    # Fit is over: the eager forward is back (a later deepcopy calls its own weights).
    assert all("forward" not in vars(p) for p in tower_parts(compiled.model))


@pytest.mark.slow
def test_a_compiled_runs_checkpoint_scores_and_exports_eager(runs, tmp_path: Path):
    module, trainer, _ = runs["compiled"]
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = load(str(path))
    categorical = torch.randint(0, 10, (64, len(checkpoint.spec.categorical)))
    dense = torch.rand(64, len(checkpoint.spec.dense)) * 100
    module.eval()
    with torch.no_grad():
        trained = torch.sigmoid(module(categorical, dense))
        scored = checkpoint.scorer(categorical, dense)[:, 0]
    torch.testing.assert_close(scored, trained, rtol=0, atol=1e-6)
    assert build(checkpoint).max_difference <= 1e-5  # torch.export of the eager network


def test_the_tower_is_every_dense_part_and_no_embedding():
    dnn = DNN([10, 20], 3, hidden=(8,))
    assert tower_parts(dnn) == [dnn.mlp]
    heads = MultiHead([10, 20], 3, heads=["click", "finish"], hidden=[], head_hidden=[4])
    assert tower_parts(heads) == list(heads.towers)  # the empty trunk has nothing to compile
    with_trunk = MultiHead([10, 20], 3, heads=["click"], hidden=[8], head_hidden=[4])
    assert tower_parts(with_trunk) == [with_trunk.trunk, with_trunk.towers[0]]
    assert list(copy.deepcopy(dnn).state_dict()) == list(dnn.state_dict())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("callbacks.compile.mode=fast", "callbacks.compile.mode='fast': expected one of default"),
        ("callbacks.compile.dynamic=maybe", "callbacks.compile.dynamic='maybe': expected null"),
    ],
)
def test_a_bad_option_stops_before_the_data(override, message, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose("compile=tower", override, f"paths.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_checks.check(OmegaConf.to_container(cfg, resolve=True))


def test_the_callback_checks_its_arguments():
    with pytest.raises(ConfigError, match=r"callbacks\.compile\.mode"):
        CompileTower(mode="fast")
    assert CompileTower(mode="max-autotune-no-cudagraphs", dynamic=True).dynamic is True
