"""Streaming across ranks and workers: every training row once per epoch, equal batch counts per
rank, every evaluation row scored once, exact resume, for uneven shard layouts.

The planning rule is checked property-style in-process; the real thing runs in 2 gloo processes
x 2 DataLoader workers over uneven Parquet shards (this file is also the rank program), and once
through `python -m train` with DDP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as the rank program
    sys.path.insert(0, str(ROOT))

from train.data.features import DataError, FeatureSpec  # noqa: E402
from train.data.io import TableFormat  # noqa: E402
from train.data.stream import (  # noqa: E402
    StreamBatches,
    StreamDataset,
    StreamTrainBatches,
    Unit,
    eval_batch_count,
    plan_slot,
    train_batch_count,
)

SPEC = FeatureSpec(
    categorical={"user": 10},
    dense=["rid"],
    behaviours={"click": "click"},
    group_key="user",
)


def write_layout(folder: Path, shard_rows: list[int], group_rows: int) -> list[Unit]:
    """Parquet shards with a global row id in `rid`; returns the row-group units."""
    folder.mkdir(parents=True, exist_ok=True)
    units, start = [], 0
    for i, rows in enumerate(shard_rows):
        ids = np.arange(start, start + rows)
        start += rows
        table = pa.table(
            {"user": ids % 5, "rid": ids.astype(np.float64), "click": (ids % 3 == 0).astype(int)}
        )
        path = folder / f"part-{i:03d}.parquet"
        pq.write_table(table, path, row_group_size=group_rows)
        meta = pq.ParquetFile(path).metadata
        units += [
            Unit(str(path), meta.row_group(g).num_rows, g) for g in range(meta.num_row_groups)
        ]
    return units


def dataset(units, *, train, batch_size, rank=0, world=1, workers=1, buffer=64, seed=3):
    return StreamDataset(
        units,
        SPEC,
        TableFormat(),
        None,
        train=train,
        batch_size=batch_size,
        rank=rank,
        world=world,
        workers=workers,
        seed=seed,
        shuffle_buffer=buffer,
    )


def ids(batch) -> list[int]:
    return [int(x) for x in batch.dense[:, 0]]


# --------------------------------------------------------------------------- the plan


@settings(max_examples=150, deadline=None)
@given(
    unit_rows=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    batch_size=st.integers(1, 16),
    world=st.integers(1, 4),
    workers=st.integers(1, 3),
    epoch=st.integers(0, 3),
    train=st.booleans(),
)
def test_plan_covers_every_row_once_with_equal_counts(
    unit_rows, batch_size, world, workers, epoch, train
):
    total = sum(unit_rows)
    if train and total < world:
        with pytest.raises(DataError, match="fewer than"):
            plan_slot(
                unit_rows, train=True, batch_size=batch_size, rank=0, world=world, slot=0,
                workers=workers,
            )  # fmt: skip
        return
    seen: Counter = Counter()
    for rank in range(world):
        batch_ids, sizes = [], []
        for slot in range(workers):
            plan = plan_slot(
                unit_rows,
                train=train,
                batch_size=batch_size,
                rank=rank,
                world=world,
                slot=slot,
                workers=workers,
                seed=7,
                epoch=epoch,
            )
            for piece in plan.pieces:
                seen.update((piece.unit, r) for r in range(piece.start, piece.stop))
            assert sum(p.stop - p.start for p in plan.pieces) == sum(plan.batch_sizes)
            batch_ids += plan.batch_ids
            sizes += plan.batch_sizes
        count = (train_batch_count if train else eval_batch_count)(total, batch_size, world)
        assert sorted(batch_ids) == list(range(count)), "same batch count on every rank"
        if train:
            by_id = [size for _, size in sorted(zip(batch_ids, sizes, strict=True))]
            assert all(s == batch_size for s in by_id[:-1]), "B-row batches but the last"
            assert 1 <= by_id[-1] <= batch_size + 1
    expected = Counter((u, r) for u, n in enumerate(unit_rows) for r in range(n))
    assert seen == expected, "every row exactly once per epoch across ranks and workers"


def test_training_order_changes_with_the_epoch_and_eval_keeps_file_order():
    rows = [5] * 20
    plans = [
        plan_slot(rows, train=True, batch_size=4, rank=0, world=1, slot=0, workers=1, epoch=e)
        for e in (0, 1)
    ]
    assert [p.unit for p in plans[0].pieces] != [p.unit for p in plans[1].pieces]
    plan = plan_slot(rows, train=False, batch_size=4, rank=0, world=1, slot=0, workers=1)
    assert [p.unit for p in plan.pieces] == list(range(20))


# --------------------------------------------------------------------------- one process


def test_stream_reads_rows_once_and_reshuffles_each_epoch(tmp_path):
    units = write_layout(tmp_path, [30, 7, 55, 1], group_rows=9)
    loader = StreamTrainBatches(dataset(units, train=True, batch_size=8, workers=1))
    epochs = []
    for _ in range(2):
        seen = [ids(b) for b in loader]
        assert len(seen) == len(loader) == train_batch_count(93, 8, 1)
        rows = [r for batch in seen for r in batch]
        assert sorted(rows) == list(range(93))
        epochs.append(rows)
    assert epochs[0] != epochs[1], "a new order each epoch"
    assert loader.state_dict()["epoch"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_the_exact_sequence(tmp_path, workers):
    units = write_layout(tmp_path, [40, 13, 61], group_rows=10)

    def fresh() -> StreamTrainBatches:
        data = dataset(units, train=True, batch_size=6, workers=max(1, workers), buffer=25)
        return StreamTrainBatches(data, num_workers=workers)

    reference = fresh()
    [ids(b) for b in reference]  # epoch 0
    second = [ids(b) for b in reference]  # epoch 1
    interrupted = fresh()
    for _ in interrupted:  # epoch 0
        pass
    iterator = iter(interrupted)  # epoch 1, stopped after 7 batches
    got = [ids(next(iterator)) for _ in range(7)]
    iterator.close()
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches_done": 7, "seed": 3}
    resumed = fresh()
    resumed.load_state_dict(state)
    got += [ids(b) for b in resumed]
    assert got == second


def test_eval_scores_every_row_once_in_equal_batch_counts(tmp_path):
    units = write_layout(tmp_path, [3, 1, 2], group_rows=2)  # 6 rows, 4 ranks x 2 workers
    per_rank = []
    for rank in range(4):
        loader = StreamBatches(
            dataset(units, train=False, batch_size=1, rank=rank, world=4, workers=2),
            num_workers=2,
        )
        per_rank.append([ids(b) for b in loader])
    assert {len(b) for b in per_rank} == {eval_batch_count(6, 1, 4)}
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(6))


# --------------------------------------------------------------------------- 2 ranks x 2 workers

LAYOUTS = [
    # (shard rows, rows per row group, batch size): fewer units than ranks x workers, one
    # tiny shard beside big ones, a tail smaller than the world, B-aligned totals, ...
    ([7], 100, 2),
    ([1, 2, 50, 3, 97], 10, 8),
    ([300, 1], 64, 16),
    ([16, 16], 16, 8),
    ([5, 5, 5], 5, 7),
]


def random_layouts(count: int, seed: int = 11) -> list[tuple[list[int], int, int]]:
    rng = np.random.default_rng(seed)
    return [
        (
            [int(x) for x in rng.integers(1, 120, rng.integers(1, 7))],
            int(rng.integers(1, 40)),
            int(rng.integers(1, 24)),
        )
        for _ in range(count)
    ]


def rank_program(rank: int, world: int, port: int, folder: Path, out: Path) -> None:
    """One DDP rank: iterate every layout (2 training epochs, 1 evaluation pass) with 2
    workers, all-reducing once per batch (a rank with an extra batch would block here)."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    layouts = json.loads((folder / "layouts.json").read_text())
    results = []
    for i, (_, _, batch) in enumerate(layouts):
        units = [Unit(**u) for u in json.loads((folder / f"units-{i}.json").read_text())]
        train = StreamTrainBatches(
            dataset(units, train=True, batch_size=batch, rank=rank, world=world, workers=2),
            num_workers=2,
        )
        evaluate = StreamBatches(
            dataset(units, train=False, batch_size=batch, rank=rank, world=world, workers=2),
            num_workers=2,
        )
        record = {"train": [], "eval": [], "len": len(train)}
        for loader, key, passes in ((train, "train", 2), (evaluate, "eval", 1)):
            for _ in range(passes):
                batches = []
                for b in loader:
                    dist.all_reduce(torch.ones(1))
                    batches.append(ids(b))
                record[key].append(batches)
        results.append(record)
    out.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_ranks_two_workers_uneven_shards(tmp_path):
    layouts = LAYOUTS + random_layouts(2)
    for i, (shards, groups, _) in enumerate(layouts):
        units = write_layout(tmp_path / f"layout-{i}", shards, groups)
        (tmp_path / f"units-{i}.json").write_text(json.dumps([u.__dict__ for u in units]))
    (tmp_path / "layouts.json").write_text(json.dumps(layouts))
    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), "2", str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung: unequal batch counts block the all-reduce")
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for i, (shards, _, batch) in enumerate(layouts):
        total = sum(shards)
        a, b = ranks[0][i], ranks[1][i]
        assert a["len"] == b["len"] == train_batch_count(total, batch, 2)
        for epoch in range(2):
            assert len(a["train"][epoch]) == len(b["train"][epoch]) == a["len"], (i, epoch)
            rows = [r for part in (a, b) for batch_ids in part["train"][epoch] for r in batch_ids]
            assert sorted(rows) == list(range(total)), f"layout {i} epoch {epoch}"
        assert a["train"][0] != a["train"][1] or total <= 2, "reshuffled each epoch"
        assert len(a["eval"][0]) == len(b["eval"][0]) == eval_batch_count(total, batch, 2)
        rows = [r for part in (a, b) for batch_ids in part["eval"][0] for r in batch_ids]
        assert sorted(rows) == list(range(total)), f"layout {i} eval"


# --------------------------------------------------------------------------- the real trainer


@pytest.mark.ddp
@pytest.mark.e2e
def test_ddp_training_streams_uneven_shards(tmp_path, zygote):
    from train.data.synthetic import FeedSimulator

    sim = FeedSimulator(n_train=3000, n_val=700, n_test=500, n_users=80, n_videos=150)
    for split in ("train", "val", "test"):
        table = sim.table(split)
        (tmp_path / split).mkdir()
        # Three shards of very different sizes, small row groups.
        for i, (a, b) in enumerate([(0, 0.1), (0.1, 0.85), (0.85, 1.0)]):
            part = table.slice(int(a * len(table)), int((b - a) * len(table)))
            pq.write_table(part, tmp_path / split / f"p{i}.parquet", row_group_size=97)
    run = tmp_path / "run"
    zygote.run(
        "data=files",
        f"data.train={tmp_path}/train",
        f"data.val={tmp_path}/val",
        f"data.test={tmp_path}/test/*.parquet",
        "data.categorical={user_id: 200, video_id: 300, device: 10}",
        "data.dense=[video_len_s, video_age_days]",
        "data.behaviours={click: click, watch_time: watch_s}",
        "data.group_key=user_id",
        "data.mode=stream",
        "data.num_workers=2",
        "data.batch_size=256",
        "data.eval_batch_size=128",
        "hardware=cpu",
        "hardware.devices=2",
        "hardware.strategy=ddp",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"paths.output_dir={run}",
        cwd=tmp_path,
        timeout=300,
        check=True,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.4 < metrics["test/click/auc"] <= 1.0
    assert json.loads((run / "stats.json").read_text())["rows"] == 3000
    import torch

    per_epoch = train_batch_count(3000, 256, 2)
    log = (run / "logs" / "metrics.csv").read_text().splitlines()
    steps = {line.split(",")[1] for line in log[1:] if line.split(",")[0] in ("0", "1")}
    assert steps == {str(per_epoch - 1), str(2 * per_epoch - 1)}, "2 epochs of equal batches"
    # Lightning keeps the stream position in the checkpoint (for an exact resume).
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    [state] = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state["batches_done"] == per_epoch and state["seed"] == 0
    assert state["epoch"] * per_epoch + state["batches_done"] == ckpt["global_step"]


if __name__ == "__main__":
    rank, world, port, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rank_program(rank, world, port, Path(folder), Path(folder) / f"rank-{rank}.json")
