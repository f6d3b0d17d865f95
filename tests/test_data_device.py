"""`data.device`: where memory mode keeps the tables (resident on a CUDA run's GPU when they fit),
pinned batches and asynchronous copies when batches come from the host to a GPU, and the errors
that name the key. Without CUDA the device decisions run against a `cuda:0` the tests name (no
tensor goes there), and the pinned path against a pinned allocator replaced by a plain one; the
tests marked `cuda` run the real thing where a GPU is present."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pyarrow.parquet as pq
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

import train.data.batch as batch_module
from tests.helpers import TINY, quiet_trainer, train_in_process
from train.data.batch import Batch
from train.data.device import RESIDENT_SHARE, require_cuda, resident_splits
from train.data.features import DataError
from train.data.loader import EvalBatches, TrainBatches
from train.data.module import ImpressionDataModule
from train.data.synthetic import FeedSimulator
from train.model import DNN
from train.module import RankingModule
from train.optim import SparseDenseAdam
from train.weights import build_scheme

SIM = FeedSimulator(n_train=2000, n_val=500, n_test=500, n_users=50, n_videos=100, n_authors=20)
ROLES = {
    "categorical": {"user_id": 100, "video_id": 200, "author_id": 50, "device": 8},
    "dense": ["video_len_s", "video_age_days"],
    "behaviours": {"click": "click", "finish": "finish"},
    "group_key": "user_id",
}
SCHEME = build_scheme(label="click", terms=[{"behaviour": "finish", "coef": 3}])
CUDA0 = torch.device("cuda:0")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def simulated(**kwargs) -> ImpressionDataModule:
    data = ImpressionDataModule(
        simulator=SIM, batch_size=256, eval_batch_size=300, **ROLES, **kwargs
    )
    data.prepare(SCHEME)
    return data


def fit(data: ImpressionDataModule, accelerator: str = "cpu") -> L.Trainer:
    torch.manual_seed(0)
    net = DNN(data.spec.cardinalities, len(data.spec.dense), hidden=(8,), embedding_dim=4)
    assert data.stats is not None
    module = RankingModule(net, SCHEME, data.spec, data.stats, optimizer=SparseDenseAdam)
    trainer = quiet_trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4
    return trainer


def fields_of(batch: Batch) -> list[torch.Tensor]:
    return [t for t in vars(batch).values() if t is not None]


# --------------------------------------------------------------------------- CPU runs


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_a_cpu_run_keeps_the_tables_on_the_cpu_and_trains(device, caplog):
    data = simulated(device=device)
    with caplog.at_level(logging.INFO, logger="train.data.device"):
        fit(data)
    assert data.target == torch.device("cpu")
    assert all(t.device.type == "cpu" for b in data.tables.values() for t in fields_of(b))
    assert not data.pin(data.tables["train"])
    batch = next(iter(data.train_dataloader()))
    assert batch.categorical.device.type == "cpu" and not batch.categorical.is_pinned()
    lines = [r.getMessage() for r in caplog.records if r.name == "train.data.device"]
    assert lines == [f"data.device={device}: train, val, test (0.00 GiB) on the CPU"]


def test_the_job_trains_on_the_cpu_with_data_device_cpu(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="train.data.device"):
        train_in_process(
            *TINY, "data.device=cpu", "trainer.max_epochs=1", output_dir=tmp_path / "run"
        )
    assert (tmp_path / "run" / "metrics.json").exists()
    assert "data.device=cpu: train, val, test" in caplog.text


def test_cuda_on_a_cpu_run_is_refused_before_anything_is_written(tmp_path):
    """No CUDA device here (the constructor says so), or a GPU machine with hardware=cpu (the
    job's check against its trainer): either way before the data is read or a file written."""
    with pytest.raises(SystemExit) as info:
        train_in_process(*TINY, "data.device=cuda", output_dir=tmp_path / "run")
    message = str(info.value.code)
    assert message.startswith("error: data.device=cuda: "), message
    assert "CUDA" in message and "data.device=auto" in message
    assert not (tmp_path / "run").exists()


def test_a_bad_value_is_refused_naming_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data.device='gpu': expected one of auto, cpu, cuda"):
        ImpressionDataModule(simulator=SIM, device="gpu", **ROLES)
    with pytest.raises(SystemExit, match=r"error: data.device='GPU': expected one of"):
        train_in_process(*TINY, "data.device=GPU", output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cuda_needs_memory_mode_and_a_cuda_run():
    with pytest.raises(DataError, match=r"data.device=cuda keeps .* data.mode is stream"):
        ImpressionDataModule(train="x", val="x", test="x", mode="stream", device="cuda", **ROLES)
    with pytest.raises(DataError, match=r"data.device=cuda: this run trains on cpu"):
        require_cuda("cuda", "memory", torch.device("cpu"))
    with pytest.raises(DataError, match=r"data.mode is stream"):  # auto chose stream
        require_cuda("cuda", "stream", CUDA0)
    require_cuda("cuda", "memory", CUDA0)
    for other in ("auto", "cpu"):
        require_cuda(other, "stream", torch.device("cpu"))


# --------------------------------------------------------------------------- decisions


def table(rows: int) -> Batch:
    return Batch(
        torch.zeros(rows, 2, dtype=torch.int64),  # 16 bytes a row
        torch.zeros(rows, 1),  # 4
        torch.zeros(rows, 1),  # 4
        torch.zeros(rows, dtype=torch.int64),  # 8
    )


def test_auto_keeps_resident_what_fits_in_its_share_train_first():
    tables = {"test": table(20), "val": table(20), "train": table(40)}  # 640, 640, 1280 bytes
    assert RESIDENT_SHARE == 0.5
    everything, line = resident_splits(tables, "auto", CUDA0, free=5120)
    assert everything == ["train", "val", "test"]
    assert line.startswith("data.device=auto: train, val, test (0.00 GiB) resident on cuda:0;")
    assert resident_splits(tables, "auto", CUDA0, free=4000)[0] == ["train", "val"]
    assert resident_splits(tables, "auto", CUDA0, free=2600)[0] == ["train"]
    # Training split too large for the share: the evaluation splits that fit still go.
    assert resident_splits(tables, "auto", CUDA0, free=1300)[0] == ["val"]
    none, line = resident_splits(tables, "auto", CUDA0, free=1000)
    assert none == [] and "on the CPU, batches copied to cuda:0 from pinned memory" in line
    assert resident_splits(tables, "cpu", CUDA0, free=None)[0] == []
    assert resident_splits(tables, "cuda", CUDA0, free=2560)[0] == ["train", "val", "test"]
    with pytest.raises(DataError, match=r"data.device=cuda: the loaded tables take .* GiB free"):
        resident_splits(tables, "cuda", CUDA0, free=2559)


def test_host_tables_for_a_cuda_run_give_pinned_batches(monkeypatch, caplog):
    """`cpu` (and `auto` when nothing fits) on a CUDA run: the tables stay on the host and the
    loaders cut pinned batches (the pinned allocator replaced by a plain one here)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 1 << 30))
    for device in ("cpu", "auto"):
        data = simulated(device=device)
        with caplog.at_level(logging.INFO, logger="train.data.device"):
            data.place(CUDA0)
        assert data.target == CUDA0 and data.tables["train"].categorical.device.type == "cpu"
        assert "batches copied to cuda:0 from pinned memory" in caplog.records[-1].getMessage()
        assert data.train_dataloader().pin and data.val_dataloader().pin
    stream = ImpressionDataModule(train="x", val="x", test="x", mode="stream", **ROLES)
    stream.target = CUDA0
    assert stream.pin()
    stream.target = torch.device("cpu")
    assert not stream.pin()


def test_pinned_batches_hold_the_same_rows(monkeypatch):
    cut = []

    def plain(shape, dtype):
        cut.append(tuple(shape))
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(batch_module, "_pinned", plain)
    data = simulated()
    train = data.tables["train"]
    # Two batches a gather (4 batches: 2 gathers), against batches gathered one by one.
    pinned = list(TrainBatches(train, 300, 1, 1, 2, pin=True, gather_rows=600))
    plain_batches = list(TrainBatches(train, 300, seed=1, rank=1, world_size=2, gather_rows=1))
    # Each gather is cut straight into one block per tensor (categorical, dense, behaviours; no
    # group in training), and the batches are views of those blocks: nothing else is pinned,
    # nothing is copied twice.
    assert len(pinned) == 4 and len(cut) == 3 * 2
    assert sum(shape[0] for shape in cut) == 3 * sum(len(b) for b in pinned)
    evaluated = list(EvalBatches(data.tables["val"], 120, 0, 2, pin=True))
    for a, b in zip(
        [*pinned, *evaluated],
        [*plain_batches, *EvalBatches(data.tables["val"], 120, 0, 2)],
        strict=True,
    ):
        for x, y in zip(fields_of(a), fields_of(b), strict=True):
            torch.testing.assert_close(x, y, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(train.index(slice(3, 9), pin=True).group, train.group[3:9])


def test_batches_go_to_a_gpu_asynchronously_and_come_back_synchronously():
    """Lightning moves our Batch with `batch.to(device)` and no arguments (it has a `.to`)."""
    calls = []

    class Spy:
        def to(self, device, non_blocking):
            calls.append((str(device), non_blocking))
            return self

    batch = Batch(Spy(), Spy(), Spy(), Spy())  # type: ignore[arg-type]
    move_data_to_device(batch, CUDA0)
    assert calls == [("cuda:0", True)] * 4
    calls.clear()
    move_data_to_device(batch, torch.device("cpu"))
    batch.to("cuda:1", non_blocking=False)
    assert calls == [("cpu", False)] * 4 + [("cuda:1", False)] * 4


# --------------------------------------------------------------------------- on a GPU


@cuda
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_tables_resident_on_the_gpu_give_gpu_batches(device, caplog):
    data = simulated(device=device)
    with caplog.at_level(logging.INFO, logger="train.data.device"):
        fit(data, "gpu")
    assert data.target is not None and data.target.type == "cuda"
    for split in ("train", "val", "test"):
        assert all(t.device == data.target for t in fields_of(data.tables[split])), split
    assert "train, val, test" in caplog.text and "resident on cuda" in caplog.text
    loader = data.train_dataloader()
    assert not loader.pin
    batch = next(iter(loader))
    assert batch.categorical.device == data.target and not batch.categorical.is_pinned()
    assert next(iter(data.val_dataloader())).dense.device == data.target


@cuda
def test_host_tables_on_a_gpu_run_give_pinned_batches_copied_asynchronously():
    data = simulated(device="cpu")
    fit(data, "gpu")
    assert data.tables["train"].categorical.device.type == "cpu"
    for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader()):
        batch = next(iter(loader))
        assert all(t.is_pinned() for t in fields_of(batch))
        moved = batch.to(data.target)
        torch.cuda.synchronize()
        for x, y in zip(fields_of(moved), fields_of(batch), strict=True):
            assert x.device == data.target
            torch.testing.assert_close(x.cpu(), y, equal_nan=True, rtol=0, atol=0)


@cuda
def test_streamed_batches_on_a_gpu_run_are_pinned(tmp_path: Path):
    for split in ("train", "val", "test"):
        pq.write_table(SIM.table(split), tmp_path / f"{split}.parquet", row_group_size=256)
    data = ImpressionDataModule(
        **{s: str(tmp_path / f"{s}.parquet") for s in ("train", "val", "test")},
        mode="stream",
        num_workers=0,
        batch_size=256,
        **ROLES,
    )
    data.prepare(SCHEME)
    fit(data, "gpu")
    loader = data.train_dataloader()
    assert loader.pin_memory
    assert all(t.is_pinned() for t in fields_of(next(iter(loader))))
