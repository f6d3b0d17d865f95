"""Sparse embedding gradients under DDP, reduced with dense collectives (train.sparse_allreduce)
so that NCCL, which has no sparse all-reduce, can run the job:

- the reduction against a dense sum, and DDP with the hook against a dense all-reduce of every
  rank's gradients, on 3 gloo processes with different row counts, one with none;
- the job on 2 processes follows today's gloo path for 50 steps, through a process group that
  refuses sparse tensors as NCCL does (tests/sparse_guard.py);
- the job on 3 processes, whose ranks touch different numbers of rows, equals 1 process at the
  same global batch.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import free_port
from tests.helpers import TINY, assert_same_logs, log_rows, train_in_process
from tests.sparse_guard import SparseRefusingGroup
from train.sparse_allreduce import reduce_gradients, sparse_all_reduce

ROWS, DIM = 40, 3
LOOKUPS = (30, 4, 0)
"""Lookups per rank in the unit test: duplicates on rank 0, a few rows on 1, none on 2."""


def rank_gradient(rank: int) -> torch.Tensor:
    """Rank `rank`'s uncoalesced sparse gradient [ROWS, DIM]; row 0 is never touched (padding
    must not bring it in)."""
    generator = torch.Generator().manual_seed(rank)
    rows = torch.randint(1, ROWS, (1, LOOKUPS[rank]), generator=generator)
    values = torch.randn(LOOKUPS[rank], DIM, generator=generator)
    return torch.sparse_coo_tensor(rows, values, (ROWS, DIM), check_invariants=True)


def ddp_gradients(
    group: dist.ProcessGroup, hook: bool | None, rank: int
) -> list[list[torch.Tensor]]:
    """Each parameter's reduced gradient (dense) over 3 steps of a small network with a sparse
    embedding, trained under DDP on `group`; ranks see different ids and row counts. `hook=None`:
    no DDP, each gradient densified and averaged with a dense all-reduce (the reference)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Embedding(ROWS, 4, sparse=True),
        nn.Flatten(),
        nn.Linear(12, 8),
        nn.ReLU(),
        nn.Linear(8, 1),
    )
    model = net if hook is None else nn.parallel.DistributedDataParallel(net, process_group=group)
    if hook:
        model.register_comm_hook(group, reduce_gradients)
    generator = torch.Generator().manual_seed(rank)
    steps = []
    for _ in range(3):
        ids = torch.randint(0, 10 * (rank + 1), (5 * (rank + 1), 3), generator=generator)
        model.zero_grad(set_to_none=True)
        model(ids).square().sum().backward()
        grads = [p.grad for p in net.parameters()]
        dense = [g.to_dense() if g.is_sparse else g.clone() for g in grads]
        if hook is None:
            for g in dense:
                dist.all_reduce(g, group=group)
                g /= dist.get_world_size(group)
        steps.append(dense)
    return steps


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)  # 3 processes on 2 cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        # The reduction: the mean of every rank's rows, coalesced, and no row but theirs.
        got = sparse_all_reduce(rank_gradient(rank), group)
        want = sum(rank_gradient(r).to_dense() for r in range(world)) / world
        assert got.is_coalesced()
        torch.testing.assert_close(got.to_dense(), want, rtol=1e-6, atol=1e-7)
        touched = torch.cat([rank_gradient(r).coalesce().indices() for r in range(world)], 1)
        assert torch.equal(got.indices()[0], touched[0].unique())
        nothing = torch.sparse_coo_tensor(
            torch.zeros(1, 0, dtype=torch.long), [], (ROWS,), check_invariants=True
        )
        assert sparse_all_reduce(nothing, group)._nnz() == 0

        # DDP with the hook: the mean of every rank's gradients, through a group that refuses
        # sparse tensors. (Not against DDP's own reduction, gloo's sparse all-reduce: that
        # corrupts the heap now and then, the reason for the hook; README.)
        reference = ddp_gradients(group, hook=None, rank=rank)
        guard = SparseRefusingGroup(group)
        hooked = ddp_gradients(guard, hook=True, rank=rank)
        for step, (old, new) in enumerate(zip(reference, hooked, strict=True)):
            for i, (a, b) in enumerate(zip(old, new, strict=True)):
                torch.testing.assert_close(
                    b, a, rtol=1e-6, atol=1e-7, msg=f"step {step} parameter {i}"
                )
        assert all(layout == "torch.strided" for _, layout, *_ in guard.log)
        assert sum(op == "allgather" for op, *_ in guard.log) > 3 * 3  # counts, indices, values
        # ... and the group refuses the sparse all-reduce DDP's own reduction sends. (Called
        # directly: a reduction that throws inside DDP's backward leaves a thread behind that
        # aborts the process at exit, "terminate called without an active exception".)
        refused = False
        try:
            SparseRefusingGroup(group).allreduce([rank_gradient(rank)], dist.AllreduceOptions())
        except RuntimeError as err:
            refused = "sparse allreduce refused" in str(err)
        assert refused
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_reduction_and_hook_on_three_gloo_processes():
    mp.spawn(_worker, args=(3, free_port()), nprocs=3)


COMMON = [*TINY, "weights=seed", "trainer.max_epochs=1", "trainer.log_every_n_steps=1"]
GUARD = "+callbacks.refuse_sparse._target_=tests.sparse_guard.refuse_sparse"


def exchanges(run: Path, world: int) -> list[list[tuple[int, int]]]:
    """Per rank, per sparse reduction: (this rank's row count, the rows it sent after padding),
    read from what the guard recorded (a count's all-gather is followed by the indices')."""
    per_rank = []
    for rank in range(world):
        log: list[list[Any]] = json.loads((run / f"collectives.{rank}.json").read_text())
        assert all(layout == "torch.strided" for _, layout, *_ in log)  # no sparse collective
        found = []
        for entry, after in itertools.pairwise(log):
            if entry[0] == after[0] == "allgather" and entry[3] == [1] and len(after[3]) == 2:
                found.append((entry[4], after[3][1]))
        per_rank.append(found)
    return per_rank


def losses(run: Path) -> list[float]:
    return [row["train/loss"] for row in log_rows(run) if "train/loss" in row]


def metrics(run: Path) -> dict[str, float]:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.ddp
def test_two_processes_follow_the_gloo_sparse_all_reduce(tmp_path, zygote):
    args = [*COMMON, "hardware.devices=2", "data.batch_size=200"]  # 20000 rows: 50 steps of 400
    zygote.run(
        *args,
        "callbacks.sparse_allreduce=null",
        f"paths.output_dir={tmp_path}/gloo",
        cwd=tmp_path,
        check=True,
    )
    zygote.run(*args, GUARD, f"paths.output_dir={tmp_path}/hook", cwd=tmp_path, check=True)
    old, new = tmp_path / "gloo", tmp_path / "hook"

    assert len(losses(new)) == 50
    assert_same_logs(new, old, tolerance=1e-6)  # every step's loss, the validation metrics
    assert metrics(new) == pytest.approx(metrics(old), abs=1e-6)
    sent = exchanges(new, 2)
    assert len(sent[0]) == len(sent[1]) == 50
    for step in zip(*sent, strict=True):  # every rank padded to the largest count
        assert {padded for _, padded in step} == {max(count for count, _ in step)}


@pytest.mark.ddp
def test_three_processes_with_uneven_rows_match_one(tmp_path, zygote):
    rows = "data.simulator.n_train=18000"  # 20 global batches of 900
    train_in_process(*COMMON, rows, "data.batch_size=900", output_dir=tmp_path / "one")
    zygote.run(
        *COMMON,
        rows,
        "hardware.devices=3",
        "data.batch_size=300",
        GUARD,
        f"paths.output_dir={tmp_path}/three",
        cwd=tmp_path,
        check=True,
    )
    one, three = tmp_path / "one", tmp_path / "three"

    sent = exchanges(three, 3)
    counts = [[count for count, _ in rank] for rank in sent]
    assert len(counts[0]) == 20
    # The ranks touch different numbers of rows (the padding is exercised), most steps.
    assert sum(len(set(step)) > 1 for step in zip(*counts, strict=True)) >= 15
    assert len(losses(one)) == len(losses(three)) == 20
    assert losses(three) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    m1, m3 = metrics(one), metrics(three)
    assert m1.keys() == m3.keys()
    for key in m1:
        assert m3[key] == pytest.approx(m1[key], abs=1e-5), key
