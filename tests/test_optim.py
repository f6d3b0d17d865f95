"""SparseDenseAdam: the row-wise lazy Adam on embedding tables matches torch.optim.SparseAdam
step for step, AdamW on the rest matches torch.optim.AdamW, untouched rows never move, and the
state round-trips through a checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from train.errors import ConfigError
from train.optim import SparseDenseAdam, adam, cosine, row_gradients, warmup_cosine


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(50, 4, sparse=True)
        self.linear = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(self.table(ids)).squeeze(-1)


def batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    # Repeated ids inside a batch: the gradient is uncoalesced, as in training.
    return [
        (torch.randint(0, 30, (64,), generator=generator), torch.rand(64, generator=generator))
        for _ in range(steps)
    ]


def train(model: nn.Module, optimizers: list[torch.optim.Optimizer], steps: int) -> None:
    for ids, target in batches(steps):
        for optimizer in optimizers:
            optimizer.zero_grad()
        nn.functional.mse_loss(model(ids), target).backward()
        for optimizer in optimizers:
            optimizer.step()


def test_matches_sparse_adam_and_adamw():
    torch.manual_seed(0)
    ours = Tiny()
    reference, initial = copy.deepcopy(ours), ours.table.weight.detach().clone()
    train(ours, [SparseDenseAdam(ours, lr=0.05, weight_decay=0.01)], steps=25)
    train(
        reference,
        [
            torch.optim.SparseAdam([reference.table.weight], lr=0.05),
            torch.optim.AdamW([reference.linear.weight], lr=0.05, weight_decay=0.01),
            torch.optim.AdamW([reference.linear.bias], lr=0.05, weight_decay=0.0),
        ],
        steps=25,
    )
    for (name, mine), theirs in zip(ours.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ours.table.weight, initial)


class TwoTables(nn.Module):
    """Tables of different sizes and widths: the lazy step runs on all their rows at once."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(50, 4, sparse=True)
        self.small = nn.Embedding(7, 3, sparse=True)
        self.linear = nn.Linear(7, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([self.table(ids), self.small(ids % 7)], 1)).squeeze(-1)


def test_several_tables_each_match_sparse_adam():
    torch.manual_seed(0)
    ours = TwoTables()
    reference = copy.deepcopy(ours)
    train(ours, [SparseDenseAdam(ours, lr=0.05, weight_decay=0.0)], steps=25)
    tables = [reference.table.weight, reference.small.weight]
    dense = [reference.linear.weight, reference.linear.bias]
    train(
        reference,
        [
            torch.optim.SparseAdam(tables, lr=0.05),
            torch.optim.AdamW(dense, lr=0.05, weight_decay=0),
        ],
        steps=25,
    )
    for (name, mine), theirs in zip(ours.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_embedding_lr_zero_freezes_the_tables_only():
    torch.manual_seed(0)
    model = Tiny()
    table, linear = model.table.weight.detach().clone(), model.linear.weight.detach().clone()
    train(model, [SparseDenseAdam(model, lr=0.05, embedding_lr=0.0)], steps=5)
    assert torch.equal(model.table.weight, table)
    assert not torch.equal(model.linear.weight, linear)


def test_rows_no_batch_touched_stay_as_they_were():
    torch.manual_seed(0)
    model = Tiny()
    before = model.table.weight.detach().clone()
    train(model, [SparseDenseAdam(model, lr=0.05)], steps=10)  # ids 0..29 only
    assert torch.equal(model.table.weight[30:], before[30:])
    assert not torch.equal(model.table.weight[:30], before[:30])


def test_state_round_trips_and_schedulers_reach_every_group():
    torch.manual_seed(0)
    model = Tiny()
    optimizer = SparseDenseAdam(model, lr=0.05)
    train(model, [optimizer], steps=5)
    resumed_model = copy.deepcopy(model)
    resumed = SparseDenseAdam(resumed_model, lr=0.05)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train(model, [optimizer], steps=5)
    train(resumed_model, [resumed], steps=5)
    for mine, theirs in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert resumed.state[resumed_model.table.weight]["step"] == 10

    warmup_cosine(optimizer, total_steps=100, warmup_steps=10)  # sets the first step's LR
    assert {round(g["lr"], 6) for g in optimizer.param_groups} == {round(0.05 / 10, 6)}


def test_config_factories_check_their_values_and_build_the_same_optimizer():
    # `optimizer=adam` / `scheduler=cosine` return what the module calls later; the values
    # are checked when the config is instantiated, before anything is written.
    torch.manual_seed(0)
    model = Tiny()
    ours, reference = copy.deepcopy(model), copy.deepcopy(model)
    factory = adam(lr=0.05, weight_decay=0.01, embedding_lr=0.02)
    optimizer = factory(ours)
    assert isinstance(optimizer, SparseDenseAdam)
    train(ours, [optimizer], steps=5)
    train(reference, [SparseDenseAdam(reference, lr=0.05, weight_decay=0.01, embedding_lr=0.02)], 5)
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    schedule = cosine(warmup_steps=10, floor=0.2)(optimizer, 100)
    assert isinstance(schedule, torch.optim.lr_scheduler.LambdaLR)
    assert [round(f(0), 6) for f in schedule.lr_lambdas] == [0.1] * len(optimizer.param_groups)
    for make, message in [
        (lambda: adam(lr=0), r"optimizer.lr=0: expected a finite number > 0"),
        (lambda: adam(lr=float("nan")), r"optimizer.lr=nan"),
        (
            lambda: adam(weight_decay=-1),
            r"optimizer.weight_decay=-1: expected a finite number >= 0",
        ),
        (lambda: adam(embedding_lr="x"), r"optimizer.embedding_lr='x'"),
        (lambda: adam(betas=(0.9, 1.0)), r"optimizer.betas=\[0.9, 1.0\]"),
        (lambda: adam(eps=0), r"optimizer.eps=0"),
        (lambda: cosine(warmup_steps=-1), r"scheduler.warmup_steps=-1: expected an integer >= 0"),
        (lambda: cosine(warmup_steps=True), r"scheduler.warmup_steps=True"),
        (lambda: cosine(floor=1.5), r"scheduler.floor=1.5: expected a number in \[0, 1\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make()


def test_row_gradients_sum_duplicates_alike_with_or_without_a_host_read():
    """The CPU path (each row once) and the device path (no read: every occurrence carries its
    row's sum) give the same row sums."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 20, (200,), generator=generator)
    values = torch.randn(200, 3, generator=generator)
    grad = torch.sparse_coo_tensor(rows[None], values, (50, 3), check_invariants=True)
    expected = torch.zeros(50, 3).index_add_(0, rows, values)
    once, sums = row_gradients(grad, distinct=True)
    assert torch.equal(once, rows.unique())
    # Summed in the entries' own order, as index_add_ adds them: the same floats, bit for bit.
    assert torch.equal(sums, expected[once])
    repeated, repeated_sums = row_gradients(grad, distinct=False)
    assert torch.equal(repeated, rows.sort().values)
    torch.testing.assert_close(repeated_sums, expected[repeated])
    assert row_gradients(grad)[0].shape == once.shape  # the CPU default: each row once
