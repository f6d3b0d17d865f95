"""In-memory batching across ranks: every row once per epoch, equal batch counts, resumable; the
objective's labels and weights made a gather at a time, as the module makes them."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import quiet_trainer
from train.data.batch import Batch
from train.data.loader import EvalBatches, TrainBatches
from train.data.module import ImpressionDataModule
from train.data.synthetic import FeedSimulator
from train.model import DNN, MultiHead
from train.module import RankingModule
from train.optim import SparseDenseAdam
from train.weights import build_scheme


def table(rows: int) -> Batch:
    ids = torch.arange(rows)
    return Batch(
        categorical=ids[:, None].clone(),
        dense=ids[:, None].float(),
        behaviours=(ids % 2)[:, None].float(),
        group=ids % 7,
    )


def seen(batches) -> list[int]:
    return [int(i) for b in batches for i in b.categorical[:, 0]]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 500), st.integers(1, 64), st.integers(1, 4))
def test_train_epoch_covers_rows_once_with_equal_counts(rows, batch_size, world):
    data = table(rows)
    per_rank = [
        list(TrainBatches(data, batch_size, seed=3, rank=r, world_size=world)) for r in range(world)
    ]
    assert len({len(b) for b in per_rank}) == 1  # equal batch counts on every rank
    assert all(len(b) > 0 for batches in per_rank for b in batches)  # never an empty batch
    rows_seen = sorted(i for batches in per_rank for i in seen(batches))
    assert len(rows_seen) == len(set(rows_seen))  # no duplicates
    dropped = rows - len(rows_seen)
    tail = rows % (batch_size * world)
    assert dropped == (tail if 0 < tail < world else 0)


def test_one_rank_at_2b_equals_two_ranks_at_b():
    data = table(1000)
    one = list(TrainBatches(data, 64, seed=1))
    two = [list(TrainBatches(data, 32, seed=1, rank=r, world_size=2)) for r in range(2)]
    for step, batch in enumerate(one):
        merged = seen([two[0][step], two[1][step]])
        assert merged == seen([batch])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 20), st.integers(1, 3), st.integers(1, 70))
def test_batches_gathered_together_are_the_batches_gathered_one_by_one(
    rows, batch_size, world, gather_rows
):
    # Several batches' rows are gathered at once and the batches are views of that gather:
    # the same rows, in the same order, as one gather per batch, on every rank.
    data = table(rows)
    for rank in range(world):
        together = TrainBatches(data, batch_size, 5, rank, world, gather_rows=gather_rows)
        one_by_one = TrainBatches(data, batch_size, 5, rank, world, gather_rows=1)
        for a, b in zip(together, one_by_one, strict=True):
            assert torch.equal(a.categorical, b.categorical)
            assert torch.equal(a.dense, b.dense) and torch.equal(a.behaviours, b.behaviours)


def test_resuming_inside_a_gather_continues_with_the_next_batch():
    data = table(300)
    fresh = TrainBatches(data, 16, seed=0, gather_rows=48)  # 3 batches a gather
    iterator = iter(fresh)
    first = [next(iterator) for _ in range(4)]  # the 2nd gather's first batch
    resumed = TrainBatches(data, 16, seed=0, gather_rows=48)
    resumed.load_state_dict(fresh.state_dict())
    assert fresh.state_dict()["batches_done"] == 4
    assert seen(first) + seen(resumed) == seen(TrainBatches(data, 16, seed=0, gather_rows=16))


def test_epochs_reshuffle_and_resume_mid_epoch():
    data = table(300)
    loader = TrainBatches(data, 16, seed=0)
    epoch0 = seen(loader)
    epoch1 = seen(loader)
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1

    fresh = TrainBatches(data, 16, seed=0)
    iterator = iter(fresh)
    first = [next(iterator) for _ in range(5)]
    state = fresh.state_dict()
    resumed = TrainBatches(data, 16, seed=0)
    resumed.load_state_dict(state)
    assert seen(first) + seen(resumed) == seen(TrainBatches(data, 16, seed=0))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(1, 50), st.integers(1, 4))
def test_eval_scores_every_row_once(rows, batch_size, world):
    data = table(rows)
    per_rank = [list(EvalBatches(data, batch_size, r, world)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    assert sorted(i for batches in per_rank for i in seen(batches)) == list(range(rows))


def id_targets(behaviours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Row-specific values, so a batch carrying another row's targets shows.
    return (behaviours > 150).float(), behaviours * 0.5 + 1


@pytest.mark.parametrize("world", [1, 2])
def test_batches_carry_the_targets_of_their_own_rows(world):
    # The loader makes the objective's targets for a whole gather; each batch's slice of them
    # is what the objective makes from that batch's own behaviours, on every rank.
    ids = torch.arange(300)
    data = Batch(
        categorical=ids[:, None], dense=ids[:, None].float(), behaviours=ids[:, None].float()
    )
    for rank in range(world):
        loader = TrainBatches(data, 16, 5, rank, world, gather_rows=48, targets=id_targets)
        batches = list(loader)
        assert len(batches) > 3  # several gathers
        for batch in batches:
            label, weight = id_targets(batch.behaviours)
            assert torch.equal(batch.label, label) and torch.equal(batch.weight, weight)
        plain = list(TrainBatches(data, 16, 5, rank, world, gather_rows=48))
        assert all(b.label is None and b.weight is None for b in plain)
        assert [seen([b]) for b in batches] == [seen([b]) for b in plain]


class LoaderTargets(L.Callback):
    """Whether each training batch came with its labels and weights."""

    def __init__(self) -> None:
        self.carried: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.carried.append(batch.label is not None)


def job(network: str) -> tuple[ImpressionDataModule, RankingModule]:
    data = ImpressionDataModule(
        categorical={"user_id": 500, "video_id": 1000, "device": 10},
        dense=["video_len_s", "user_activity"],
        behaviours={"click": "click", "finish": "finish", "watch_time": "watch_s"},
        group_key="user_id",
        simulator=FeedSimulator(n_train=20 * 128, n_val=128, n_test=128, n_users=200),
        batch_size=128,
    )
    scheme = build_scheme(
        label="click",
        terms=[{"behaviour": "finish", "coef": 3}, {"behaviour": "click", "coef": 1}],
        normalize="mean",
    )
    data.prepare(scheme)
    torch.manual_seed(0)
    args = (data.spec.cardinalities, len(data.spec.dense))
    model = DNN(*args) if network == "dnn" else MultiHead(*args, heads=["click", "finish"])
    return data, RankingModule(model, scheme, data.spec, data.stats, optimizer=SparseDenseAdam)


def trainer(*callbacks: L.Callback) -> L.Trainer:
    return quiet_trainer(
        accelerator="cpu", max_steps=20, limit_val_batches=0, callbacks=list(callbacks)
    )


def fit(network: str, loader_targets: bool, monkeypatch) -> tuple[RankingModule, list[bool]]:
    data, module = job(network)
    if not loader_targets:  # the module makes them itself, from each batch's behaviours
        monkeypatch.setattr(RankingModule, "setup", L.LightningModule.setup)
    spy = LoaderTargets()
    trainer(spy).fit(module, datamodule=data)
    monkeypatch.undo()
    assert data.targets is None  # a later fit brings its own objective's
    return module, spy.carried


@pytest.mark.parametrize("network", ["dnn", "multihead"])
def test_the_job_trains_alike_with_targets_made_by_the_loader(network, monkeypatch):
    made, carried = fit(network, loader_targets=True, monkeypatch=monkeypatch)
    own, not_carried = fit(network, loader_targets=False, monkeypatch=monkeypatch)
    assert carried == [True] * 20 and not_carried == [False] * 20
    for (name, a), b in zip(made.state_dict().items(), own.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class Failing(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 2:
            raise RuntimeError("a fit that fails")


def test_a_failed_fit_takes_its_targets_back():
    # Lightning skips the module's teardown when a fit raises; the data module's own
    # on_exception drops the targets, so no loader built later carries a dead fit's objective.
    data, module = job("dnn")
    with pytest.raises(RuntimeError, match="a fit that fails"):
        trainer(Failing()).fit(module, datamodule=data)
    assert data.targets is None
