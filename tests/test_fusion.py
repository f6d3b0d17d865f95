"""The no-retrain fusion baseline: the α sweep over saved predictions (exactly the metrics of a
single head when α selects it), the α grid, and the fusion rows of `python -m train.report`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from train.heads import HeadOutputs, fused_score
from train.layout import PREDICTIONS_FILE
from train.metrics import BehaviourMetrics
from train.report import build_report, find_runs, fusion, main
from train.report.fusion import FusionError, alpha_grid, fusion_metrics, read_predictions
from train.storage import write_parquet

HEADS = ["click", "finish", "watch_time", "like"]
CONTINUOUS = ["watch_time"]


def outputs(rows: int = 3000, seed: int = 0, xauc_pairs: int = 20_000) -> tuple[HeadOutputs, dict]:
    """A HeadOutputs filled in three batches with behaviours that follow the heads' scores a
    little, probabilities with ties (rounded) and exact zeros in the like head."""
    g = torch.Generator().manual_seed(seed)
    out = HeadOutputs(HEADS, HEADS, CONTINUOUS, "click", ["click"], xauc_pairs, seed=7)
    for n in (rows // 3, rows // 3, rows - 2 * (rows // 3)):
        probs = torch.rand(n, 4, generator=g).mul(100).round().div(100).clamp(0.01, 0.99)
        probs[:, 3] = torch.where(probs[:, 3] < 0.05, 0.0, probs[:, 3])
        click = (torch.rand(n, generator=g) < probs[:, 0]).float()
        finish = click * (torch.rand(n, generator=g) < probs[:, 1]).float()
        watch = click * torch.rand(n, generator=g).mul(60).round()
        like = click * (torch.rand(n, generator=g) < 0.3).float()
        behaviours = torch.stack([click, finish, watch, like], 1)
        groups = torch.randint(0, 40, (n,), generator=g)
        oracle = probs[:, :1].clone()
        out.update(probs.float(), behaviours, groups, oracle, oracle)
    return out, out.compute()


def write_predictions(folder: Path, fusion_config: dict | None = None) -> Path:
    out, gathered = outputs()
    table = out.table(gathered, fusion_config or {"click": 1.0})
    folder.mkdir(parents=True, exist_ok=True)
    write_parquet(str(folder / PREDICTIONS_FILE), table)
    return folder / PREDICTIONS_FILE


def head_metrics_directly(url: Path, head: str) -> dict[str, float]:
    """BehaviourMetrics on one head's saved probabilities, as the job scores a single model."""
    table = pq.read_table(url)
    metrics = BehaviourMetrics(HEADS, CONTINUOUS, "click", (), 20_000, 7)
    values = torch.from_numpy(np.stack([table.column(f"y_{b}").to_numpy() for b in HEADS], 1))
    metrics.update(
        torch.from_numpy(table.column(f"p_{head}").to_numpy()),
        values,
        torch.from_numpy(table.column("group").to_numpy()),
    )
    got = metrics.compute()
    return {k: v for k, v in got.items() if k.rsplit("/", 1)[1] in ("auc", "gauc", "xauc")}


@pytest.mark.parametrize("head", HEADS)
def test_alpha_selecting_one_head_reproduces_its_metrics_exactly(tmp_path, head):
    url = write_predictions(tmp_path)
    pred = read_predictions(str(url))
    swept = fusion_metrics(pred, {head: 1.0})
    direct = head_metrics_directly(url, head)
    assert swept == direct  # bit-identical, every behaviour's auc/gauc/xauc
    assert set(swept) == {
        "click/auc",
        "click/gauc",
        "finish/auc",
        "finish/gauc",
        "watch_time/auc",
        "watch_time/xauc",
        "like/auc",
        "like/gauc",
    }
    assert not any(math.isnan(v) for v in swept.values())


def test_fusion_changes_the_ranking_and_ignores_zero_alpha_heads(tmp_path):
    pred = read_predictions(str(write_predictions(tmp_path)))
    assert (pred.probs[:, 3] == 0).any()  # log 0 = -inf must not reach a head with α = 0
    mixed = fusion_metrics(pred, {"click": 1.0, "finish": 2.0})
    assert mixed != fusion_metrics(pred, {"click": 1.0})
    # Σ α log p ranks alike under a positive scaling of α
    assert fusion_metrics(pred, {"click": 2.0, "finish": 4.0}) == mixed
    score = fused_score(pred.probs, [1.0, 0.0, 0.0, 0.0])
    assert score.dtype == torch.float64 and torch.isfinite(score).all()
    with pytest.raises(FusionError, match=r"α names \['share'\]"):
        fusion_metrics(pred, {"share": 1.0})


def test_predictions_file_describes_itself(tmp_path):
    url = write_predictions(tmp_path, {"click": 1.0, "finish": 0.5})
    table = pq.read_table(url)
    assert table.num_rows == 3000
    assert table.column_names == [
        "group",
        *(f"y_{b}" for b in HEADS),
        *(f"p_{h}" for h in HEADS),
        "oracle_click",
    ]
    pred = read_predictions(str(url))
    assert (pred.heads, pred.label, pred.continuous) == (HEADS, "click", CONTINUOUS)
    assert pred.fusion == {"click": 1.0, "finish": 0.5}
    assert (pred.xauc_pairs, pred.seed) == (20_000, 7)
    pq.write_table(table.replace_schema_metadata({}), tmp_path / "bare.parquet")
    with pytest.raises(FusionError, match="no upweight metadata"):
        read_predictions(str(tmp_path / "bare.parquet"))


def test_head_outputs_metrics_measure_each_head():
    # (the label's logloss and calibration come from BehaviourMetrics, given its head's
    # probability: tests/test_multihead.py checks they equal its head's)
    out, gathered = outputs()
    got = out.metrics(gathered)
    assert set(got) == {
        "click/head_auc",
        "click/head_logloss",
        "click/head_calibration",
        "finish/head_auc",
        "finish/head_logloss",
        "finish/head_calibration",
        "watch_time/head_auc",
        "watch_time/head_xauc",
        "like/head_auc",
        "like/head_logloss",
        "like/head_calibration",
    }
    assert got["click/head_auc"] > 0.6  # click was drawn from the click head's probability


def test_alpha_grid():
    grid = alpha_grid(HEADS, "click", (0, 0.5, 1), extra=[{"click": 1.0, "finish": 0.5}])
    assert len(grid) == 27 + 3  # the label at 1 x 3 values for 3 heads, + each other head alone
    assert grid[0] == {"click": 1.0}
    assert {"finish": 1.0} in grid and {"like": 1.0} in grid and {"click": 1.0} in grid
    assert all(a.get("click") == 1.0 for a in grid[:27])
    assert len({json.dumps(a, sort_keys=True) for a in grid}) == len(grid)  # no duplicates
    assert alpha_grid(HEADS, "click", (0, 1), extra=[{"like": 2.0}])[-1] == {"like": 2.0}
    assert fusion.describe({"like": 1.0, "click": 1.0, "finish": 0.0}, HEADS) == "click=1 like=1"
    assert fusion.parse_grid("0, 0.5,2") == (0.0, 0.5, 2.0)
    with pytest.raises(FusionError, match="--fusion-grid 'a,b'"):
        fusion.parse_grid("a,b")


def make_run(folder: Path, model: dict, metrics: dict, weights_name: str = "click_only") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "data": {"behaviours": {h: h for h in HEADS}},
        "model": model,
        "weights": {"name": weights_name, "label": "click", "terms": []},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_report_rows_fusion_grid_beside_schemes(tmp_path):
    scheme_metrics = {
        "test/click/auc": 0.7,
        "test/finish/auc": 0.6,
        "test/watch_time/xauc": 0.6,
        "test/like/auc": 0.6,
    }
    make_run(tmp_path / "a_click", {"_target_": "train.model.DNN"}, scheme_metrics)
    multihead = {"_target_": "train.model.MultiHead", "heads": HEADS, "fusion": None}
    head_run = make_run(
        tmp_path / "b_multihead", multihead, {**scheme_metrics, "test/click/head_auc": 0.7}
    )
    write_predictions(head_run)
    runs, _ = find_runs([str(tmp_path)])
    report = build_report(runs)
    kinds = [r.kind for r in report.rows]
    assert kinds.count("scheme") == 1 and kinds.count("fusion") == 30
    labels = {r.label: r for r in report.rows}
    assert "fusion click=1" in labels and "fusion finish=1" in labels
    assert "fusion click=1 finish=0.5 watch_time=1 like=0.5" in labels
    pred = read_predictions(str(head_run / PREDICTIONS_FILE))
    assert labels["fusion like=1"].values == fusion_metrics(pred, {"like": 1.0})
    assert labels["fusion like=1"].source == str(head_run)
    # the Pareto marks and best-in-column run over schemes and fusion points together
    assert any(report.pareto[i] for i, r in enumerate(report.rows) if r.kind == "fusion")

    # without predictions (or on another split) the run's own fusion is one row
    (head_run / PREDICTIONS_FILE).unlink()
    runs, _ = find_runs([str(tmp_path)])
    rows = [r for r in build_report(runs).rows if r.kind == "fusion"]
    assert [(r.label, r.values["click/auc"]) for r in rows] == [("fusion click=1", 0.7)]
    assert "click/head_auc" not in rows[0].values


def test_report_cli_sweeps_a_smaller_grid(tmp_path, capsys):
    multihead = {"_target_": "train.model.MultiHead", "heads": HEADS, "fusion": {"click": 1}}
    write_predictions(make_run(tmp_path / "run", multihead, {"test/click/auc": 0.5}))
    written = main([str(tmp_path), "--fusion-grid", "0,1"])
    csv_text = (tmp_path / "report.csv").read_text()
    assert csv_text.count(",fusion,") == 8 + 3
    assert (tmp_path / "pareto.png").stat().st_size > 0 and len(written) == 3
    with pytest.raises(SystemExit, match="--fusion-grid 'x'"):
        main([str(tmp_path), "--fusion-grid", "x"])
    capsys.readouterr()
