"""Tests for train.metrics against sklearn / brute-force references, including real 2-rank DDP."""

from __future__ import annotations

import math
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from train import metrics
from train.calibration import OddsCorrection
from train.metrics import (
    XAUC,
    BehaviourMetrics,
    GroupAUC,
    auc,
    calibration,
    gauc,
    grouped_auc,
    logloss,
    ndcg,
    xauc,
)
from train.weights import build_scheme

BEHAVIOURS = ("click", "like", "watch_time")
CONTINUOUS = ("watch_time",)
LABEL = "click"
ORACLE = ("click", "watch_time")
GROUP_IDS = torch.tensor([-(2**62), -7, 0, 3, 1_000_003, 2**62 + 11], dtype=torch.long)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tied_scores(n: int, g: torch.Generator) -> torch.Tensor:
    # One decimal: about 11 distinct values, so almost every score is tied with others.
    return torch.round(torch.rand(n, generator=g, dtype=torch.float64) * 10) / 10


def _grouped_data(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    preds = _tied_scores(n, g)
    target = (torch.rand(n, generator=g) < 0.4).to(torch.float64)
    groups = GROUP_IDS[torch.randint(0, len(GROUP_IDS), (n,), generator=g)]
    # Extra groups: singletons and single-class ones, which gauc has to skip.
    extra_groups = torch.tensor([5, 6, 9, 9, 9, -3, -3], dtype=torch.long)
    extra_target = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    extra_preds = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.5, 0.2, 0.8], dtype=torch.float64)
    return (
        torch.cat([preds, extra_preds]),
        torch.cat([target, extra_target]),
        torch.cat([groups, extra_groups]),
    )


def _reference_grouped(preds, target, groups):
    """Per-group loop with sklearn: {group id: (auc or None, n_rows)}."""
    out = {}
    for gid in sorted(set(groups.tolist())):
        mask = (groups == gid).numpy()
        y = target.numpy()[mask] > 0
        value = roc_auc_score(y, preds.numpy()[mask]) if 0 < y.sum() < len(y) else None
        out[gid] = (value, int(mask.sum()))
    return out


def _brute_xauc(preds: list[float], values: list[float]) -> float:
    score = count = 0.0
    for i in range(len(preds)):
        for j in range(i + 1, len(preds)):
            if values[i] == values[j]:
                continue
            count += 1
            if preds[i] == preds[j]:
                score += 0.5
            elif (preds[i] > preds[j]) == (values[i] > values[j]):
                score += 1
    return score / count if count else math.nan


def _assert_same(a: float, b: float, tol: float = 1e-12) -> None:
    if math.isnan(a) or math.isnan(b):
        assert math.isnan(a) and math.isnan(b), (a, b)
    else:
        assert abs(a - b) <= tol, (a, b)


def _assert_same_dict(a: dict[str, float], b: dict[str, float], tol: float = 1e-12) -> None:
    assert set(a) == set(b)
    for key in a:
        assert isinstance(a[key], float), key
        _assert_same(a[key], b[key], tol)


# --------------------------------------------------------------------------------------------
# auc / grouped_auc / gauc
# --------------------------------------------------------------------------------------------


def test_auc_matches_sklearn_with_ties() -> None:
    g = _gen(1)
    preds = _tied_scores(2000, g)
    target = (torch.rand(2000, generator=g) < 0.3).to(torch.float32)
    result = auc(preds.to(torch.float32), target)
    assert result.dtype == torch.float64 and result.ndim == 0
    _assert_same(result.item(), roc_auc_score(target.numpy(), preds.numpy()))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 2.0, math.inf]), st.booleans()),
        min_size=0,
        max_size=40,
    )
)
def test_auc_property_vs_sklearn(rows: list[tuple[float, bool]]) -> None:
    preds = torch.tensor([p for p, _ in rows], dtype=torch.float64)
    target = torch.tensor([float(y) for _, y in rows], dtype=torch.float64)
    result = auc(preds, target).item()
    n_pos = int(target.sum())
    if 0 < n_pos < len(rows):
        finite = torch.where(torch.isinf(preds), 1e6, preds)  # sklearn refuses inf
        _assert_same(result, roc_auc_score(target.numpy(), finite.numpy()))
    else:
        assert math.isnan(result)


def test_auc_undefined_cases() -> None:
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])).item())
    assert math.isnan(auc(torch.tensor([]), torch.tensor([])).item())
    assert math.isnan(auc(torch.tensor([0.1, math.nan]), torch.tensor([0, 1])).item())
    # Non-binary targets: anything > 0 is a positive.
    assert auc(torch.tensor([0.1, 0.3, 0.2]), torch.tensor([0.0, 3.5, -1.0])).item() == 1.0
    with pytest.raises(ValueError):
        auc(torch.zeros(3), torch.zeros(4))


def test_grouped_auc_matches_per_group_sklearn() -> None:
    preds, target, groups = _grouped_data()
    auc_g, n_rows, both = grouped_auc(preds, target, groups)
    ref = _reference_grouped(preds, target, groups)
    assert list(ref) == torch.unique(groups).tolist()
    assert n_rows.dtype == torch.long and both.dtype == torch.bool
    for i, (value, n) in enumerate(ref.values()):
        assert n_rows[i].item() == n
        assert both[i].item() == (value is not None)
        _assert_same(auc_g[i].item(), math.nan if value is None else value)
    # The extra singleton and single-class groups are there and skipped.
    assert int((~both).sum()) >= 4


def test_gauc_matches_weighted_loop() -> None:
    preds, target, groups = _grouped_data(seed=3)
    ref = _reference_grouped(preds, target, groups)
    num = sum(n * v for v, n in ref.values() if v is not None)
    den = sum(n for v, n in ref.values() if v is not None)
    _assert_same(gauc(preds, target, groups).item(), num / den)
    # Group ids are labels only: relabelling them must not change anything.
    relabelled = groups * 3 - 5
    _assert_same(gauc(preds, target, relabelled).item(), num / den)


def test_gauc_ties_do_not_cross_groups() -> None:
    preds = torch.tensor([0.5, 0.5, 0.5, 0.5])
    target = torch.tensor([1, 0, 1, 0])
    groups = torch.tensor([1, 1, 2, 2])
    assert gauc(preds, target, groups).item() == 0.5
    auc_g, _, _ = grouped_auc(
        torch.tensor([0.5, 0.5, 0.5, 0.7]), torch.tensor([1, 0, 0, 1]), groups
    )
    assert auc_g.tolist() == [0.5, 1.0]


def test_gauc_without_valid_group_is_nan() -> None:
    preds = torch.tensor([0.1, 0.2, 0.3])
    target = torch.tensor([1, 0, 1])
    assert math.isnan(gauc(preds, target, torch.tensor([1, 2, 3])).item())
    empty = torch.tensor([])
    assert math.isnan(gauc(empty, empty, torch.tensor([], dtype=torch.long)).item())


# --------------------------------------------------------------------------------------------
# xauc
# --------------------------------------------------------------------------------------------


def _xauc_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    values = torch.round(torch.rand(n, generator=g, dtype=torch.float64) * 5)  # many ties, zeros
    preds = _tied_scores(n, g) + 0.05 * values
    return preds, values


def test_xauc_exact_vs_brute_force() -> None:
    preds, values = _xauc_data(80, seed=4)
    expected = _brute_xauc(preds.tolist(), values.tolist())
    _assert_same(xauc(preds, values).item(), expected)
    assert 0.5 < expected < 1.0


def test_xauc_exact_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    preds, values = _xauc_data(97, seed=5)
    whole = xauc(preds, values).item()
    monkeypatch.setattr(metrics, "_PAIR_CHUNK", 300)  # several blocks of rows
    _assert_same(xauc(preds, values).item(), whole)


def test_xauc_sampled_close_to_exact_and_deterministic() -> None:
    preds, values = _xauc_data(1000, seed=6)
    exact = xauc(preds, values, n_pairs=1000 * 999 // 2).item()
    sampled = xauc(preds, values, n_pairs=200_000, seed=7).item()
    assert abs(sampled - exact) < 0.01
    assert xauc(preds, values, n_pairs=200_000, seed=7).item() == sampled
    assert xauc(preds, values, n_pairs=200_000, seed=8).item() != sampled


def test_xauc_undefined_cases() -> None:
    assert math.isnan(xauc(torch.tensor([0.1, 0.2]), torch.tensor([3.0, 3.0])).item())
    assert math.isnan(xauc(torch.tensor([0.1]), torch.tensor([3.0])).item())
    assert math.isnan(xauc(torch.tensor([0.1, math.nan]), torch.tensor([1.0, 2.0])).item())
    with pytest.raises(ValueError):
        xauc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 2.0]), n_pairs=0)


# --------------------------------------------------------------------------------------------
# calibration / logloss
# --------------------------------------------------------------------------------------------


def test_logloss_and_calibration_match_references() -> None:
    g = _gen(9)
    probs = torch.rand(500, generator=g, dtype=torch.float64) * 0.98 + 0.01
    target = (torch.rand(500, generator=g) < probs).to(torch.float64)
    _assert_same(logloss(probs, target).item(), log_loss(target.numpy(), probs.numpy()))
    _assert_same(
        calibration(probs, target).item(), probs.numpy().mean() / (target.numpy() > 0).mean()
    )


def test_logloss_clamps_and_calibration_without_positive() -> None:
    probs = torch.tensor([0.0, 1.0, 1.0, 0.0])
    target = torch.tensor([0.0, 1.0, 0.0, 1.0])
    p = np.clip(probs.numpy().astype(np.float64), 1e-7, 1 - 1e-7)
    y = target.numpy()
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    _assert_same(logloss(probs, target).item(), float(expected), tol=1e-9)
    assert math.isnan(calibration(torch.tensor([0.2, 0.4]), torch.tensor([0, 0])).item())


# --------------------------------------------------------------------------------------------
# Metric classes
# --------------------------------------------------------------------------------------------


def _split_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    oracle_click = torch.rand(n, generator=g, dtype=torch.float64)
    click = (torch.rand(n, generator=g, dtype=torch.float64) < oracle_click).to(torch.float32)
    like = (torch.rand(n, generator=g) < 0.2).to(torch.float32)
    watch_positive = torch.rand(n, generator=g, dtype=torch.float64)
    watch_mean = watch_positive * 30
    watch = torch.where(
        torch.rand(n, generator=g, dtype=torch.float64) < watch_positive,
        torch.round(watch_mean * torch.rand(n, generator=g, dtype=torch.float64)),
        0.0,
    ).to(torch.float32)
    probs = torch.round((0.5 * oracle_click + 0.5 * torch.rand(n, generator=g)) * 20) / 20
    return {
        "probs": probs.to(torch.float32),
        "behaviours": torch.stack([click, like, watch], dim=1),
        "groups": GROUP_IDS[torch.randint(0, len(GROUP_IDS), (n,), generator=g)]
        + torch.randint(0, 40, (n,), generator=g),
        "oracle": torch.stack([oracle_click, watch_mean], dim=1).to(torch.float32),
        "oracle_positive": torch.stack([oracle_click, watch_positive], dim=1).to(torch.float32),
    }


def _slice(data: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in data.items()}


EXPECTED_KEYS = {
    "click/auc",
    "click/gauc",
    "click/logloss",
    "click/calibration",
    "click/odds_factor",
    "click/calibration_corrected",
    "like/auc",
    "like/gauc",
    "watch_time/xauc",
    "watch_time/auc",
    "click/ndcg@10",
}
EXPECTED_ORACLE_KEYS = {
    "click/oracle_auc",
    "click/oracle_gauc",
    "click/oracle_logloss",
    "click/oracle_calibration",
    "watch_time/oracle_xauc",
    "watch_time/oracle_auc",
    "click/oracle_ndcg@10",
}


def test_behaviour_metrics_keys_and_values_without_oracle() -> None:
    data = _split_data(300, seed=10)
    metric = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL)
    metric.update(data["probs"], data["behaviours"], data["groups"])
    out = metric.compute()
    assert set(out) == EXPECTED_KEYS
    probs, beh, groups = data["probs"], data["behaviours"], data["groups"]
    click, like, watch = beh.unbind(1)
    expected = {
        "click/auc": auc(probs, click),
        "click/gauc": gauc(probs, click, groups),
        "click/logloss": logloss(probs, click),
        "click/calibration": calibration(probs, click),
        "like/auc": auc(probs, like),
        "like/gauc": gauc(probs, like, groups),
        "watch_time/xauc": xauc(probs, watch),
        "watch_time/auc": auc(probs, watch),
        "click/ndcg@10": ndcg(probs, click > 0, groups),
    }
    fitted = OddsCorrection.fit(probs, click, "click")
    expected["click/odds_factor"] = torch.tensor(fitted.odds_factor, dtype=torch.float64)
    expected["click/calibration_corrected"] = calibration(fitted.apply(probs), click)
    _assert_same_dict(out, {k: v.item() for k, v in expected.items()})
    assert out["click/calibration_corrected"] == pytest.approx(1.0, abs=1e-9)


def test_behaviour_metrics_oracle_values() -> None:
    data = _split_data(300, seed=11)
    metric = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL, oracle=ORACLE)
    metric.update(**data)
    out = metric.compute()
    assert set(out) == EXPECTED_KEYS | EXPECTED_ORACLE_KEYS
    beh, groups = data["behaviours"], data["groups"]
    click, _, watch = beh.unbind(1)
    o_click, o_watch = data["oracle"].unbind(1)
    o_watch_pos = data["oracle_positive"][:, 1]
    expected = {
        "click/oracle_auc": auc(o_click, click),
        "click/oracle_gauc": gauc(o_click, click, groups),
        "click/oracle_logloss": logloss(o_click, click),
        "click/oracle_calibration": calibration(o_click, click),
        "watch_time/oracle_xauc": xauc(o_watch, watch),
        "watch_time/oracle_auc": auc(o_watch_pos, watch),
        "click/oracle_ndcg@10": ndcg(o_click, click > 0, groups),
    }
    for key, value in expected.items():
        _assert_same(out[key], value.item())
    # The oracle beats the noisy model it was derived from.
    assert out["click/oracle_auc"] > out["click/auc"]

    # Without oracle_positive, the continuous oracle AUC falls back to the expectation.
    fallback = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL, oracle=ORACLE)
    fallback.update(data["probs"], beh, groups, oracle=data["oracle"])
    out2 = fallback.compute()
    _assert_same(out2["watch_time/oracle_auc"], auc(o_watch, watch).item())
    _assert_same(out2["click/oracle_auc"], out["click/oracle_auc"])


def test_behaviour_metrics_continuous_label_oracle_probability() -> None:
    data = _split_data(200, seed=12)
    metric = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, "watch_time", oracle=ORACLE)
    metric.update(**data)
    out = metric.compute()
    watch = data["behaviours"][:, 2]
    o_watch_pos = data["oracle_positive"][:, 1]
    _assert_same(out["watch_time/oracle_logloss"], logloss(o_watch_pos, watch).item())
    _assert_same(out["watch_time/calibration"], calibration(data["probs"], watch).item())
    # E[watch time] is no probability: without oracle_positive there is no oracle logloss.
    metric = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, "watch_time", oracle=ORACLE)
    metric.update(data["probs"], data["behaviours"], data["groups"], oracle=data["oracle"])
    assert math.isnan(metric.compute()["watch_time/oracle_logloss"])


def test_behaviour_metrics_accumulation_equals_single_update() -> None:
    data = _split_data(1700, seed=13)  # > 1414 rows: xauc samples its pairs
    one = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL, oracle=ORACLE)
    one.update(**data)
    many = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL, oracle=ORACLE)
    for start, stop in [(0, 1), (1, 500), (500, 500), (500, 1234), (1234, 1700)]:
        many.update(**_slice(data, start, stop))
    _assert_same_dict(one.compute(), many.compute(), tol=0.0)
    many.reset()
    many.update(**_slice(data, 0, 10))
    assert set(many.compute()) == EXPECTED_KEYS | EXPECTED_ORACLE_KEYS


def test_behaviour_metrics_validation() -> None:
    with pytest.raises(ValueError):
        BehaviourMetrics(BEHAVIOURS, ("dwell",), LABEL)
    with pytest.raises(ValueError):
        BehaviourMetrics(BEHAVIOURS, CONTINUOUS, "share")
    with pytest.raises(ValueError):
        BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL, oracle=("share",))
    data = _split_data(20, seed=14)
    metric = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL, oracle=ORACLE)
    with pytest.raises(ValueError):
        metric.update(data["probs"], data["behaviours"], data["groups"])
    with pytest.raises(ValueError):
        metric.update(data["probs"], data["behaviours"][:, :2], data["groups"], data["oracle"])
    plain = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL)
    with pytest.raises(ValueError):
        plain.update(data["probs"], data["behaviours"], data["groups"], data["oracle"])


def test_group_auc_and_xauc_metrics_accumulate() -> None:
    preds, target, groups = _grouped_data(seed=15)
    metric = GroupAUC()
    metric.update(preds[:100], target[:100], groups[:100])
    metric.update(preds[100:], target[100:], groups[100:])
    result = metric.compute()
    assert result.dtype == torch.float64
    _assert_same(result.item(), gauc(preds, target, groups).item())

    values, vals = _xauc_data(300, seed=16)
    x = XAUC(n_pairs=10_000, seed=3)
    x.update(values[:120], vals[:120])
    x.update(values[120:], vals[120:])
    _assert_same(x.compute().item(), xauc(values, vals, 10_000, 3).item(), tol=0.0)


def test_metrics_before_update_are_nan() -> None:
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(GroupAUC().compute().item())
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL).compute()
    assert set(out) == EXPECTED_KEYS
    assert all(math.isnan(v) for v in out.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_under_deterministic_algorithms() -> None:
    data = _split_data(3000, seed=18)
    cpu = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL, oracle=ORACLE, xauc_pairs=100_000)
    cpu.update(**data)
    expected = cpu.compute()
    previous = torch.are_deterministic_algorithms_enabled()
    # Lightning's deterministic=True sets this; no op used here may refuse to run under it.
    torch.use_deterministic_algorithms(True)
    try:
        gpu = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL, oracle=ORACLE, xauc_pairs=100_000)
        gpu = gpu.to("cuda")
        gpu.update(**{k: v.cuda() for k, v in data.items()})
        got = gpu.compute()
        preds, target, groups = _grouped_data(seed=19)
        auc_g, n_rows, both = grouped_auc(preds.cuda(), target.cuda(), groups.cuda())
    finally:
        torch.use_deterministic_algorithms(previous)
    _assert_same_dict(got, expected, tol=1e-12)
    ref = grouped_auc(preds, target, groups)
    assert auc_g.is_cuda and torch.equal(n_rows.cpu(), ref[1]) and torch.equal(both.cpu(), ref[2])
    torch.testing.assert_close(auc_g.cpu(), ref[0], equal_nan=True, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# DDP: 2 real gloo processes
# --------------------------------------------------------------------------------------------

_DDP_ROWS = 900
_DDP_SPLIT = 310  # rank 0 gets rows [0, 310), rank 1 the rest: uneven on purpose
_DDP_XAUC_PAIRS = 50_000  # < 900 * 899 / 2, so BehaviourMetrics samples its XAUC pairs

# Run in fresh interpreters rather than via mp.spawn, which would re-import this module (and
# sklearn, hypothesis) in every rank; this way a rank only pays for torch + torchmetrics.
_DDP_WORKER = """
import datetime, pickle, sys
import torch
import torch.distributed as dist
from train.metrics import BehaviourMetrics, GroupAUC
from train.weights import build_scheme

rank, world, port, data_path, out_path, split, pairs = sys.argv[1:]
rank, world, split, pairs = int(rank), int(world), int(split), int(pairs)
torch.set_num_threads(1)
data = torch.load(data_path)
behaviours, continuous, label, oracle = data.pop("spec")
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
    timeout=datetime.timedelta(seconds=60),
)

GAIN = build_scheme(label="click", terms=[{"behaviour": "like", "coef": 3}], name="graded")

def run(parts):
    beh = BehaviourMetrics(behaviours, continuous, label, oracle, xauc_pairs=pairs)
    graded = BehaviourMetrics(behaviours, continuous, label, ndcg_k=5, ndcg_gain=GAIN)
    group_auc = GroupAUC()
    for part in parts:
        beh.update(**part)
        graded.update(part["probs"], part["behaviours"], part["groups"])
        group_auc.update(part["probs"], part["behaviours"][:, 1], part["groups"])
    ndcg = graded.compute()["click/ndcg_graded@5"]
    return {**beh.compute(), "group_auc": group_auc.compute().item(), "graded": ndcg}

start, stop = [(0, split), (split, None)][rank]
uneven = run([{k: v[start:stop] for k, v in data.items()}])
# Rank 1 sees no data at all: exercises the typed placeholder for empty states.
empty = run([data] if rank == 0 else [])
with open(out_path, "wb") as f:
    pickle.dump((uneven, empty), f)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_args(rank: int, port: int, tmp_path: Path) -> list[str]:
    data, out = tmp_path / "data.pt", tmp_path / f"rank{rank}.pkl"
    return [str(x) for x in (rank, 2, port, data, out, _DDP_SPLIT, _DDP_XAUC_PAIRS)]


@pytest.mark.ddp
def test_ddp_two_ranks_match_single_process(tmp_path: Path) -> None:
    data = _split_data(_DDP_ROWS, seed=17)
    torch.save({**data, "spec": (BEHAVIOURS, CONTINUOUS, LABEL, ORACLE)}, tmp_path / "data.pt")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DDP_WORKER, *_worker_args(rank, port, tmp_path)],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, output

    beh = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL, ORACLE, xauc_pairs=_DDP_XAUC_PAIRS)
    beh.update(**data)
    group_auc = GroupAUC()
    group_auc.update(data["probs"], data["behaviours"][:, 1], data["groups"])
    gain = build_scheme(label="click", terms=[{"behaviour": "like", "coef": 3}], name="graded")
    graded = BehaviourMetrics(BEHAVIOURS, CONTINUOUS, LABEL, ndcg_k=5, ndcg_gain=gain)
    graded.update(data["probs"], data["behaviours"], data["groups"])
    expected = {
        **beh.compute(),
        "group_auc": group_auc.compute().item(),
        "graded": graded.compute()["click/ndcg_graded@5"],
    }
    assert "watch_time/xauc" in expected and not math.isnan(expected["click/gauc"])
    # ndcg@k is computed from the gathered rows: the uneven and empty shards give it exactly
    assert not math.isnan(expected["click/ndcg@10"]) and not math.isnan(expected["graded"])
    for rank in range(2):
        uneven, empty = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        _assert_same_dict(uneven, expected, tol=1e-9)
        _assert_same_dict(empty, expected, tol=1e-9)
