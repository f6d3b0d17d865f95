"""In-memory batching across ranks: every row once per epoch, equal batch counts, resumable."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from train.data.batch import Batch
from train.data.loader import EvalBatches, TrainBatches


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
