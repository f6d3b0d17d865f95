"""The multi-task rivals of sample weighting: MMoE and PLE networks, ESMM-style conditional
heads, per-head weight schemes, loss balancing (fixed, uncertainty, GradNorm), their bad inputs,
and one real mmoe run whose saved predictions the report's sweep reproduces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import SPEC, TINY, log_rows, train_in_process, write_checkpoint
from train import export
from train.balance import Fixed, GradNorm, Uncertainty, balance_for
from train.checkpoint import load
from train.data.features import FeatureSpec
from train.data.stats import TrainStats
from train.errors import ConfigError
from train.heads import PerHeadBCE, loss_denominators, with_conditionals
from train.layout import PREDICTIONS_FILE
from train.model import MultiHead, logit_of_log
from train.multitask import PLE, MMoE
from train.objective import Evaluation, loss_sums
from train.report import fusion
from train.weights import SchemeError, Term, WeightScheme, build_scheme

HEADS = ["click", "finish", "watch_time", "like"]


def inputs(rows: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (rows, 2), generator=g), torch.randn(rows, 3, generator=g)


# --------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------


def test_mmoe_gates_sum_to_one_per_row_and_heads_differ():
    net = MMoE([20, 20], 3, HEADS, experts=3, hidden=[8], head_hidden=[4], embedding_dim=4)
    categorical, dense = inputs()
    x = net.shared(categorical, dense)
    gates = net.gate_weights(x)
    assert gates.shape == (64, 4, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(64, 4))
    assert (gates >= 0).all()
    assert not torch.allclose(gates[:, 0], gates[:, 1])  # one gate per head, not one for all
    assert net(categorical, dense).shape == (64, 4)


def test_ple_with_one_level_and_no_shared_experts_is_one_tower_per_task():
    net = PLE(
        [20, 20],
        3,
        ["click", "finish"],
        levels=1,
        task_experts=1,
        shared_experts=0,
        hidden=[6],
        head_hidden=[5],
        embedding_dim=4,
    )
    categorical, dense = inputs()
    x = net.shared(categorical, dense)
    level = net.levels[0]
    assert level.shared_gate is None and level.shared is None
    # By hand: head k = tower_k(expert_k(x)); its gate softmaxes a single logit, so weighs 1.
    by_hand = torch.cat(
        [net.towers[k](level.task[k](x)[0]) for k in range(2)],
        dim=1,
    )
    torch.testing.assert_close(net(categorical, dense), by_hand)


def test_ple_levels_feed_task_and_shared_mixtures_forward():
    net = PLE([20, 20], 3, HEADS, levels=3, shared_experts=2, hidden=[8], embedding_dim=4)
    categorical, dense = inputs()
    logits = net(categorical, dense)
    assert logits.shape == (64, 4) and torch.isfinite(logits).all()
    assert [lvl.shared_gate is None for lvl in net.levels] == [False, False, True]
    logits.sum().backward()  # every expert of every level is on some head's path
    assert all(p.grad is not None for n, p in net.named_parameters() if "levels" in n)


@pytest.mark.parametrize("cls", [MultiHead, MMoE, PLE])
def test_conditional_heads_output_the_probability_of_the_product(cls):
    torch.manual_seed(0)
    net = cls([20, 20], 3, HEADS, condition={"finish": "click", "like": "finish"})
    plain = cls([20, 20], 3, HEADS)
    plain.load_state_dict(net.state_dict())
    categorical, dense = inputs()
    raw = torch.sigmoid(plain(categorical, dense))  # every head's own probability
    p = torch.sigmoid(net(categorical, dense))
    torch.testing.assert_close(p[:, 0], raw[:, 0])  # click and watch time: unconditioned
    torch.testing.assert_close(p[:, 2], raw[:, 2])
    torch.testing.assert_close(p[:, 1], raw[:, 0] * raw[:, 1])  # p(click)·p(finish | click)
    torch.testing.assert_close(p[:, 3], raw[:, 0] * raw[:, 1] * raw[:, 3])  # down the chain
    assert ((p >= 0) & (p <= 1)).all() and (p[:, 3] <= p[:, 1]).all() and (p[:, 1] <= p[:, 0]).all()


def test_conditional_head_trains_on_every_row_and_on_its_own_where_the_parent_happened():
    """Rows without a click still teach the conditional finish head: its loss is BCE of
    p(click)·p(finish | click) against finish on every row, so a non-click row pushes the
    product down through the finish tower; the click tower learns from the click loss alone.
    Its own logit, p(finish | click), is also fitted on the clicked rows, and only there."""
    torch.manual_seed(0)
    net = MultiHead(
        [20, 20], 3, ["click", "finish"], hidden=[], head_hidden=[8], condition={"finish": "click"}
    )
    categorical, dense = inputs()
    logits = net(categorical, dense)
    no_click = torch.zeros(64)  # rows with no click (and so no finish)
    F.binary_cross_entropy_with_logits(logits[:, 1], no_click).backward()
    finish_tower = net.towers[1][-1].weight.grad
    assert finish_tower is not None and finish_tower.abs().sum() > 0
    click_tower = net.towers[0][-1].weight.grad
    assert click_tower is None or click_tower.abs().sum() == 0  # p(click) is held constant

    trained = net.training_logits(net.shared(categorical, dense))
    assert trained.shape == (64, 3)  # click, finish, finish | click
    torch.testing.assert_close(trained[:, :2], logits.detach())
    product = torch.sigmoid(trained[:, 0]) * torch.sigmoid(trained[:, 2])
    torch.testing.assert_close(torch.sigmoid(trained[:, 1]), product)
    click = (torch.arange(64) % 4 == 0).float()
    finish = click * (torch.arange(64) % 8 == 0).float()
    label = torch.stack([click, finish], dim=1)
    weight = torch.full((64, 2), 2.0)
    label, weight = with_conditionals(label, weight, net.chain)
    torch.testing.assert_close(label[:, 2], finish)
    torch.testing.assert_close(weight[:, 2], 2.0 * click)  # the clicked rows alone
    # ... and a clicked row weighs as much in the own fit as in the product's loss (the own
    # loss is divided by the finish weight of every row, not of the clicked ones).
    per_row = weight / loss_denominators(weight.sum(0), net.chain)
    torch.testing.assert_close(per_row[click > 0, 2], per_row[click > 0, 1])
    assert per_row[:, 2].sum() == pytest.approx(click.mean().item())


def test_logit_of_the_log_probability_is_finite_at_the_extremes():
    log_p = torch.tensor([0.0, -1e-30, -1e-8, -0.5, -20.0, -200.0])
    logits = logit_of_log(log_p)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(torch.sigmoid(logits[2:]), torch.exp(log_p[2:]), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------
# per-head weights
# --------------------------------------------------------------------------------------------


def spec_and_stats() -> tuple[FeatureSpec, TrainStats]:
    spec = FeatureSpec(
        categorical={"user_id": 20}, dense=[], behaviours={h: h for h in HEADS}, group_key="user_id"
    )
    stats = TrainStats(
        rows=100,
        dense_mean=[],
        dense_std=[],
        behaviour_mean={h: 1.0 for h in HEADS},
        positive_rate={h: 0.5 for h in HEADS},
        continuous=["watch_time"],
        weight_mean=1.0,
    )
    return spec, stats


def test_a_head_scheme_weighs_its_loss_as_repeated_rows():
    spec, stats = spec_and_stats()
    click_scheme = build_scheme(
        name="integer",
        terms=[{"behaviour": "click"}, {"behaviour": "finish", "coef": 2}],
        negative_weight=2,
    )
    objective = PerHeadBCE(
        HEADS, {"click": 1.0}, WeightScheme(), spec, stats, Evaluation(), {"click": click_scheme}
    )
    g = torch.Generator().manual_seed(1)
    click = (torch.rand(50, generator=g) < 0.4).float()
    finish = click * (torch.rand(50, generator=g) < 0.5).float()
    behaviours = torch.stack([click, finish, 30 * finish, click * 0], dim=1)
    logits = torch.randn(50, 4, generator=g)
    label, weight = objective.targets(behaviours)
    summed = loss_sums(logits, label, weight)
    click_loss = summed[0] / weight[:, 0].sum()
    # The same rows, each repeated by its weight (negatives 2, clicks 1 or 3), unweighted.
    repeats = weight[:, 0].long()
    assert set(repeats.tolist()) == {1, 2, 3}
    repeated = F.binary_cross_entropy_with_logits(
        logits[:, 0].repeat_interleave(repeats), click.repeat_interleave(repeats)
    )
    torch.testing.assert_close(click_loss, repeated)
    # The other heads keep their own weighting: finish unweighted, watch time by value.
    assert (weight[:, 1] == 1).all() and (weight[:, 3] == 1).all()
    assert weight[:, 2].max() > 1


def test_head_schemes_name_the_head_when_they_read_a_missing_behaviour():
    spec, stats = spec_and_stats()
    share = WeightScheme(terms=(Term("share"),), name="shares")
    with pytest.raises(SchemeError, match=r"model.head_weights.click \(shares\).*'share'"):
        PerHeadBCE(
            HEADS, {"click": 1.0}, WeightScheme(), spec, stats, Evaluation(), {"click": share}
        )
    with pytest.raises(SchemeError, match=r"model.head_weights.share: not a head"):
        PerHeadBCE(
            HEADS, {"click": 1.0}, WeightScheme(), spec, stats, Evaluation(), {"share": share}
        )


# --------------------------------------------------------------------------------------------
# balancing
# --------------------------------------------------------------------------------------------


def two_tasks(noise: tuple[float, float], rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and two binary labels that depend on the inputs alike, each flipped at random
    with its own probability (its irreducible noise)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 8, generator=g)
    clean = (x[:, :4].sum(1) > 0).float()
    labels = [torch.where(torch.rand(rows, generator=g) < p, 1 - clean, clean) for p in noise]
    return x, torch.stack(labels, dim=1)


def fit(balance, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> None:
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    heads = torch.nn.Linear(16, 2)
    params = [*trunk.parameters(), *heads.parameters(), *balance.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.02)
    for _ in range(steps):
        shared = trunk(x)
        losses = F.binary_cross_entropy_with_logits(heads(shared), y, reduction="none").mean(0)
        loss = balance.combine(losses, losses.detach(), shared, lambda t: t, 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        balance.after_step()


def test_uncertainty_weighs_the_less_noisy_task_more():
    x, y = two_tasks(noise=(0.02, 0.35))
    balance = Uncertainty(["clean", "noisy"])
    fit(balance, x, y)
    clean, noisy = balance.effective().tolist()
    assert clean > 2 * noisy, (clean, noisy)


def test_gradnorm_weights_keep_their_sum_and_favour_the_slower_task():
    x, y = two_tasks(noise=(0.02, 0.35))
    balance = GradNorm(["clean", "noisy"], alpha=1.5)
    fit(balance, x, y, steps=150)
    weights = balance.effective()
    assert weights.sum().item() == pytest.approx(2.0, rel=1e-5)
    # The noisy task's loss falls slower relative to its start: GradNorm gives it more weight.
    assert weights[1] > weights[0]


def test_fixed_balance_scales_each_head():
    balance = balance_for({"method": "fixed", "weights": {"finish": 0.5}}, ["click", "finish"])
    assert isinstance(balance, Fixed)
    losses = torch.tensor([2.0, 4.0])
    assert balance.combine(losses, losses).item() == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("sgd", r"model.balance.method='sgd': expected one of"),
        ({"method": "fixed", "weights": {"share": 1}}, r"model.balance.weights.share: not a head"),
        ({"method": "fixed", "weights": {"click": -1}}, r"model.balance.weights.click=-1"),
        ({"method": "uncertainty", "alpha": 1}, r"model.balance.alpha: not an option"),
        ({"method": "gradnorm", "alpha": "x"}, r"model.balance.alpha='x'"),
        ([1], r"model.balance=\[1\]"),
    ],
)
def test_bad_balance_configs_are_named(config, message):
    with pytest.raises(ConfigError, match=message):
        balance_for(config, ["click", "finish"])


# --------------------------------------------------------------------------------------------
# the job: bad inputs end with `error:` naming the key; one real mmoe run
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.condition={finish: share}"],
            "error: model.condition.finish: 'share' is not a head",
        ),
        (
            ["model.condition={finish: like, like: finish}"],
            "error: model.condition.finish: the conditions form a cycle (finish -> like -> finish)",
        ),
        (
            ["model.head_weights={click: {terms: [{behaviour: share}]}}"],
            "error: model.head_weights.click (custom): weights.terms[0]",
        ),
        (
            ["model.head_weights={click: nosuch}"],
            "error: model.head_weights.click='nosuch': no weight scheme",
        ),
        (["model.balance=sgd"], "error: model.balance.method='sgd'"),
    ],
)
def test_bad_multitask_inputs_end_with_an_error_naming_the_key(overrides, message, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        train_in_process(*TINY, "model=mmoe", *overrides, output_dir=tmp_path / "run")
    assert message in str(exit_.value)
    assert not (tmp_path / "run").exists()


COMMON = [
    *TINY,
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "data.simulator.n_test=2001",  # odd: under DDP the ranks hold different row counts
    "model=mmoe",
    "model.hidden=[16]",
    "model.head_hidden=[8]",
    "model.fusion={click: 1, finish: 0.5}",
    "model.condition={finish: click}",
    "model.head_weights={click: seed, like: engagement}",
    "model.balance=gradnorm",
]
"""An mmoe run with every multi-task option: conditions, per-head weights, GradNorm."""


@pytest.fixture(scope="module")
def mmoe_run(tmp_path_factory) -> Path:
    """One process at batch 2048 (the DDP test's reference: 2 processes at 1024)."""
    folder = tmp_path_factory.mktemp("mmoe") / "run"
    train_in_process(*COMMON, "data.batch_size=2048", output_dir=folder)
    return folder


HEAD_LOGS = [f"train/{h}/{k}" for h in HEADS for k in ("loss", "head_weight")] + [
    "train/finish/given_click/loss"  # the conditional head's own loss, on clicked rows
]


def steps(run: Path) -> list[float]:
    """Every logged step's per-head loss and balance weight, flattened."""
    return [r[k] for r in log_rows(run) if "train/loss" in r for k in HEAD_LOGS]


@pytest.mark.e2e
def test_sweep_over_mmoe_predictions_reproduces_each_heads_metrics(mmoe_run):
    metrics = json.loads((mmoe_run / "metrics.json").read_text())
    pred = fusion.read_predictions(str(mmoe_run / PREDICTIONS_FILE))
    assert pred.heads == HEADS and pred.probs.shape == (2001, 4)
    configured = fusion.fusion_metrics(pred, pred.fusion)
    assert configured == {k: metrics[f"test/{k}"] for k in configured}
    for head in HEADS:
        alone = fusion.fusion_metrics(pred, {head: 1.0})
        assert alone[f"{head}/auc"] == metrics[f"test/{head}/head_auc"]
    # the conditional finish head's probability never exceeds the click head's
    assert (pred.probs[:, 1] <= pred.probs[:, 0] + 1e-7).all()


@pytest.mark.e2e
def test_mmoe_run_logs_each_heads_loss_and_balance_weight(mmoe_run):
    rows = [r for r in log_rows(mmoe_run) if "train/loss" in r]
    assert len(rows) == 10  # every step of the epoch (20000 rows / 2048)
    for row in rows:
        assert set(HEAD_LOGS) <= row.keys()
        # GradNorm keeps Σ w_h = heads
        assert sum(row[f"train/{h}/head_weight"] for h in HEADS) == pytest.approx(4, rel=1e-5)
        total = sum(row[f"train/{h}/loss"] for h in HEADS)
        assert row["train/loss"] == pytest.approx(total, rel=1e-5)
    assert rows[-1]["train/finish/head_weight"] != 1.0  # the weights learn


@pytest.mark.ddp
def test_two_processes_match_one_with_head_weights_conditions_and_gradnorm(
    mmoe_run, tmp_path, zygote
):
    """Per-head weights are global weighted means per head, and GradNorm's norms are summed
    over ranks: 2 processes at batch B train exactly like 1 process at batch 2B, and save every
    test row's predictions once, in the order the metrics saw them."""
    zygote.run(
        *COMMON,
        "data.batch_size=1024",
        "hardware.devices=2",
        f"paths.output_dir={tmp_path}/two",
        cwd=tmp_path,
        check=True,
    )
    one, two = steps(mmoe_run), steps(tmp_path / "two")
    assert len(one) == len(two) == 10 * len(HEAD_LOGS)
    assert one == pytest.approx(two, rel=1e-4, abs=1e-6)
    m1 = json.loads((mmoe_run / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1.keys() == m2.keys()
    for key in m1:
        assert m1[key] == pytest.approx(m2[key], abs=1e-5), key
    # so the sweep still reproduces the run's own numbers exactly
    pred = fusion.read_predictions(str(tmp_path / "two" / PREDICTIONS_FILE))
    assert pred.probs.shape == (2001, 4)
    swept = fusion.fusion_metrics(pred, pred.fusion)
    assert swept == {k: m2[f"test/{k}"] for k in swept}


@pytest.mark.parametrize("target", ["train.multitask.MMoE", "train.multitask.PLE"])
def test_expert_networks_with_conditions_export_for_any_batch_size(target, tmp_path):
    """torch.export with a dynamic batch (nothing specialises on the row count), and the
    reloaded program scores like the checkpoint (`export.build` checks it on 257 rows)."""
    spec = {**SPEC, "behaviours": {"click": "click", "finish": "finish"}}
    ckpt = write_checkpoint(
        tmp_path / "two.ckpt",
        target,
        spec=spec,
        heads=["click", "finish"],
        fusion={"click": 1, "finish": 1},
        condition={"finish": "click"},
        hidden=[8],
        head_hidden=[4],
    )
    artifact = export.build(load(str(ckpt)))
    assert artifact.max_difference <= export.ATOL
