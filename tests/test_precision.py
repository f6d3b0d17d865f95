"""Mixed precision: `hardware=auto` takes bf16-mixed where the device multiplies bf16 in
hardware, and bf16-mixed trains as float32 does (50 steps of the job's RankingModule +
lightning.Trainer on the CPU, losses and final weights within a bound), with the weights, the
optimizer's state and the checkpoint in float32; and every path of the job (DeepFM, mmoe with
GradNorm, attention over a history, the compiled tower, TorchRec's sharded tables) trains at
bf16-mixed as in float32."""

from __future__ import annotations

import importlib.util
import math

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import TINY, compose, log_rows, quiet_trainer, train_in_process
from tests.test_compile import STEPS, Losses, data_module, scheme
from train import host
from train.model import DNN, MultiHead
from train.module import RankingModule
from train.optim import SparseDenseAdam

# Measured (torch 2.13, a 2-core AVX512-BF16 CPU): losses within 5e-4 of float32's over the 50
# steps; the final weights apart by 2-3% of how far float32's training moved them. bf16 keeps 8
# bits of mantissa (a relative 4e-3), so the matmuls differ from float32's in the third digit;
# Adam's normalised steps make that a sign flip for the weights whose gradients are near 0.
LOSS_TOLERANCE = 5e-3
WEIGHT_TOLERANCE = 0.1


@pytest.mark.parametrize("hardware", ["auto", "slurm", "cpu"])
@pytest.mark.parametrize(
    ("flags", "native"),
    [({"avx512_bf16": True}, True), ({"amx_bf16": True}, True), ({"avx512": True}, False)],
)
def test_auto_takes_bf16_where_the_cpu_computes_it(hardware, flags, native, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine's CUDA GPU decides hardware=auto")
    # Both kinds of CPU on any machine: the composed config, not this CPU, is under test.
    monkeypatch.setattr(host, "cpu_capabilities", lambda: flags)
    cfg = compose(f"hardware={hardware}", "paths.output_dir=/tmp/unused")
    wanted = "bf16-mixed" if native and hardware != "cpu" else "32-true"
    assert OmegaConf.select(cfg, "trainer.precision") == wanted
    assert host.precision_for("mps") == "32-true"  # nothing claimed for devices not measured


def fit(data, network, precision: str) -> tuple[RankingModule, L.Trainer, Losses]:
    module = RankingModule(network, scheme(), data.spec, data.stats, optimizer=SparseDenseAdam)
    losses = Losses()
    trainer = quiet_trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=STEPS,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[losses],
    )
    trainer.fit(module, datamodule=data)
    return module, trainer, losses


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dnn", "multihead"])
def test_bf16_mixed_trains_as_float32_does(model):
    data = data_module()
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        cardinalities, dense = data.spec.cardinalities, len(data.spec.dense)
        if model == "dnn":
            network = DNN(cardinalities, dense, embedding_dim=8, hidden=(32, 16))
        else:
            network = MultiHead(cardinalities, dense, heads=["click", "finish"], hidden=(32, 16))
        init = {k: v.clone() for k, v in network.state_dict().items()}
        runs[precision] = fit(data, network, precision)
    (full, _, full_losses), (mixed, trainer, mixed_losses) = runs["32-true"], runs["bf16-mixed"]
    assert len(full_losses.values) == len(mixed_losses.values) == STEPS
    gaps = [abs(a - b) for a, b in zip(full_losses.values, mixed_losses.values, strict=True)]
    assert max(gaps) < LOSS_TOLERANCE
    assert max(gaps) > 0, "bf16-mixed computed exactly float32's losses: no bf16 matmul ran"
    full_state, mixed_state = full.state_dict(), mixed.state_dict()
    assert all(v.dtype == full_state[k].dtype for k, v in mixed_state.items())
    # How far the weights ended apart, against how far float32's training moved them.
    apart = torch.cat(
        [(mixed.model.state_dict()[k] - v).flatten() for k, v in full.model.state_dict().items()]
    )
    moved = torch.cat([(v - init[k]).flatten() for k, v in full.model.state_dict().items()])
    assert apart.norm() < WEIGHT_TOLERANCE * moved.norm()
    # Master weights and Adam's moments stay float32: only the forward's matmuls are bf16.
    states = trainer.optimizers[0].state.values()
    assert all(
        t.dtype == torch.float32 for s in states for t in s.values() if t.is_floating_point()
    )


FEATURES = {
    "deepfm": ["model=deepfm"],
    "mmoe with conditions and GradNorm": [
        "model=mmoe",
        "model.condition={finish: click}",
        "model.balance=gradnorm",
    ],
    "attention over a history": [
        "data.sequences={hist_categories: {table: category, max_len: 30, pooling: attention}}",
        "data.simulator.interest_scale=0.6",
    ],
    "compiled tower": ["compile=tower"],
    "sharded tables": ["sharding=torchrec"],
}


@pytest.mark.e2e
@pytest.mark.parametrize("feature", FEATURES)
def test_each_feature_trains_at_bf16_mixed_as_in_float32(feature, tmp_path):
    """bf16-mixed is the default on GPUs and on bf16 CPUs: every path of the job trains there as
    in float32 (tests elsewhere pin float32 with hardware=cpu). Measured: the logged training
    losses (0.8 to 0.5 over the 40 steps) within 3e-4 of float32's, test AUCs within 0.008."""
    if feature == "sharded tables" and importlib.util.find_spec("torchrec") is None:
        pytest.skip("the optional torchrec engine is absent")
    overrides = [*TINY, *FEATURES[feature], "trainer.max_epochs=2", "trainer.log_every_n_steps=5"]
    auc, losses = {}, {}
    for precision in ("32-true", "bf16-mixed"):
        run = tmp_path / precision
        auc[precision] = train_in_process(
            *overrides, f"trainer.precision={precision}", output_dir=run
        )
        losses[precision] = [r["train/loss"] for r in log_rows(run) if "train/loss" in r]
    assert len(losses["bf16-mixed"]) == len(losses["32-true"]) == 8
    gaps = [abs(a - b) for a, b in zip(losses["32-true"], losses["bf16-mixed"], strict=True)]
    assert max(gaps) < LOSS_TOLERANCE, losses
    assert all(math.isfinite(a) for a in auc.values()), auc
    assert abs(auc["bf16-mixed"] - auc["32-true"]) < 0.02, auc
