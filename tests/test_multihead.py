"""`model=multihead`: the network and its fused score, per-head loss weights, and one real run
(e2e) whose saved predictions reproduce its own metrics through the report's α sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.helpers import (
    SPEC,
    TINY_TRAINED,
    train_in_process,
    trained_run,
    write_checkpoint,
)
from train import heads, weights
from train.checkpoint import load
from train.layout import PREDICTIONS_FILE
from train.metrics import ndcg, scheme_gains
from train.model import MultiHead
from train.report import build_report, draw_pareto, find_runs, fusion, scheme_rows, write_report

HEADS = ["click", "finish", "watch_time", "like"]


def test_one_logit_per_head_and_the_fused_score():
    torch.manual_seed(0)
    net = MultiHead([50, 80], 3, HEADS, {"click": 1, "finish": 0.5}, 4, [16], [8])
    assert net.heads == HEADS and net.fusion == {"click": 1.0, "finish": 0.5}
    logits = net(torch.randint(0, 50, (7, 2)), torch.randn(7, 3))
    assert logits.shape == (7, 4)
    p = torch.sigmoid(logits)
    torch.testing.assert_close(net.score(logits), p[:, 0] * p[:, 1] ** 0.5)
    # the fusion is a scoring choice: it is not in the state dict
    assert not any("alpha" in k for k in net.state_dict())
    assert MultiHead([50], 0, HEADS, None, 4, [], []).fusion == {"click": 1.0}


@pytest.mark.parametrize(
    ("heads", "fusion_config", "message"),
    [
        (["click", "click"], None, "distinct behaviours"),
        ([], None, "distinct behaviours"),
        (HEADS, {"share": 1}, "model.fusion names 'share', which is not a head"),
        (HEADS, {"click": 0, "like": 0}, "weighs every head 0"),
        (HEADS, {"click": float("nan")}, "model.fusion.click must be a finite number"),
    ],
)
def test_bad_heads_or_fusion_are_named(heads, fusion_config, message):
    with pytest.raises(ValueError, match=message):
        MultiHead([50], 2, heads, fusion_config)


def test_continuous_heads_weigh_positives_by_value_over_their_mean():
    scales = heads.head_scales(["click", "watch_time"], ["watch_time"], {"watch_time": 20.0})
    values = torch.tensor([[1.0, 40.0], [0.0, 0.0], [1.0, 5.0]])
    weights = heads.head_weights(values, scales)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0], [1.0, 1.0], [1.0, 0.25]]))
    with pytest.raises(ValueError, match=r"'watch_time' is continuous but .* no positive"):
        heads.head_scales(["watch_time"], ["watch_time"], {})


def test_scorer_of_a_multihead_checkpoint_gives_the_fused_score_and_every_head(tmp_path):
    spec = {**SPEC, "behaviours": {"click": "click", "like": "like"}}
    ckpt = write_checkpoint(
        tmp_path / "mh.ckpt",
        target="train.model.MultiHead",
        spec=spec,
        heads=["click", "like"],
        fusion={"click": 1.0, "like": 2.0},
        head_hidden=[4],
    )
    scorer = load(str(ckpt)).scorer
    assert scorer.outputs == ["score", "p_click", "p_like"]
    out = scorer(torch.randint(0, 10, (5, 3)), torch.randn(5, 2))
    torch.testing.assert_close(out[:, 0], out[:, 1] * out[:, 2] ** 2)


# --------------------------------------------------------------------------------------------
# one real run (e2e)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multihead")
    train_in_process(
        *TINY_TRAINED,
        "model=multihead",
        "model.fusion={click: 1, finish: 0.5, watch_time: 0.25}",
        "model.hidden=[64]",  # a shared trunk as well as the towers
        "model.head_hidden=[16]",
        "metrics.ndcg_gain=seed",  # graded NDCG gains: a finish counts more than a click
        output_dir=folder / "run",
    )
    return folder / "run"


@pytest.mark.e2e
def test_run_saves_every_heads_test_predictions(run):
    table = pq.read_table(run / PREDICTIONS_FILE)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert table.num_rows == config["data"]["simulator"]["n_test"] == 2000  # the test split, once
    assert {f"p_{h}" for h in HEADS} | {f"y_{h}" for h in HEADS} <= set(table.column_names)
    assert {"group", "oracle_click", "oracle_positive_watch_time"} <= set(table.column_names)
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert {f"{split}/{h}/head_auc" for h in HEADS} <= set(metrics)
        assert f"{split}/watch_time/head_xauc" in metrics
    # the label's logloss/calibration measure its head (the fused score is no probability)
    assert metrics["test/click/logloss"] == metrics["test/click/head_logloss"]
    scorer = load(str(run / "checkpoints" / "best.ckpt")).scorer
    assert scorer.outputs == ["score", *(f"p_{h}" for h in HEADS), "p_calibrated"]
    # p_calibrated corrects the label head, with the factor the best model's val fitted.
    correction = scorer.correction
    assert correction.label == "click" and scorer.label_column == HEADS.index("click")
    # (val/ metrics pass through Lightning's float32 logging)
    assert correction.odds_factor == pytest.approx(metrics["val/click/odds_factor"], rel=1e-6)
    p_click = torch.from_numpy(table.column("p_click").to_numpy()).double()
    y_click = torch.from_numpy(table.column("y_click").to_numpy()) > 0
    assert float(correction.apply(p_click).mean() / y_click.double().mean()) == pytest.approx(
        metrics["test/click/calibration_corrected"], abs=1e-5
    )


@pytest.mark.e2e
def test_sweep_reproduces_the_runs_own_metrics_exactly(run):
    metrics = json.loads((run / "metrics.json").read_text())
    pred = fusion.read_predictions(str(run / PREDICTIONS_FILE))
    assert pred.fusion == {"click": 1.0, "finish": 0.5, "watch_time": 0.25}
    configured = fusion.fusion_metrics(pred, pred.fusion)
    assert configured == {k: metrics[f"test/{k}"] for k in configured}
    for head in HEADS:
        alone = fusion.fusion_metrics(pred, {head: 1.0})
        assert alone[f"{head}/auc"] == metrics[f"test/{head}/head_auc"]
    alone = fusion.fusion_metrics(pred, {"watch_time": 1.0})
    assert alone["watch_time/xauc"] == metrics["test/watch_time/head_xauc"]
    # NDCG ranks each user's rows by the fused score, with the seed scheme's gains
    fused = heads.fused_score(pred.probs, [pred.fusion.get(h, 0.0) for h in pred.heads])
    gains = scheme_gains(weights.gain_scheme("seed"), pred.values, pred.behaviours)
    assert {k for k in metrics if "ndcg" in k} == {
        f"{split}/click/{m}@10"
        for split in ("val", "test")
        for m in ("ndcg_seed", "oracle_ndcg_seed")
    }
    assert metrics["test/click/ndcg_seed@10"] == ndcg(fused, gains, pred.groups, 10).item()


@pytest.mark.e2e
def test_report_draws_the_fusion_front_beside_a_scheme(run, tmp_path_factory):
    scheme_run = trained_run(tmp_path_factory)
    runs, _ = find_runs([str(run), str(scheme_run)])
    report = build_report(runs, sources=(scheme_rows, _grid_01))
    kinds = [r.kind for r in report.rows]
    assert kinds.count("scheme") == 1 and kinds.count("fusion") == 8 + 3 + 1
    out = tmp_path_factory.mktemp("report")
    write_report(report, str(out))
    assert (out / "pareto.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "*fusion click=1 finish=0.5 watch_time=0.25*" in md
    # readable with a dozen fusion points: text only on each pair's front, numbers elsewhere
    fig, plan = draw_pareto(report)
    import matplotlib.pyplot as plt

    for ax, panel in zip(fig.axes, plan.panels, strict=False):
        gids = [t.get_gid() for t in ax.texts]
        assert 0 < gids.count("label") <= len(panel.labelled) < len(report.rows) - 1
        assert gids.count("label") + gids.count("number") == len(panel.labelled + panel.numbered)
    plt.close(fig)
    assert all(f"| {n} | {report.rows[i].label} |" in md for i, n in plan.numbers.items())
    assert "## Verdict per pair" in md and "`fusion` " in md


def _grid_01(runs, split):
    return fusion.fusion_rows(runs, split, grid=(0.0, 1.0))
