"""Real DDP on CPU (gloo): 2 processes at batch B == 1 process at batch 2B, for a weighted
scheme with list columns — the loss is the global weighted mean and metrics cover every rank's
rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.helpers import TINY, train_in_process

COMMON = [
    *TINY,
    "weights=seed",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "data.simulator.n_val=5001",  # odd: ranks hold different row counts
    "data.simulator.n_test=5001",
    # List columns too: a shared table's sparse gradients and the attention's dense ones.
    "data.sequences={hist_videos: {table: video_id, max_len: 8, pooling: attention}, "
    "tags: {max_len: 3, pooling: sum}}",
]
STEPS_PER_EPOCH = 20  # 20000 rows / global batch 1024


def losses(folder: Path) -> list[float]:
    rows = csv.DictReader((folder / "logs" / "metrics.csv").open())
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.ddp
def test_two_processes_match_one(tmp_path, zygote):
    train_in_process(*COMMON, "data.batch_size=1024", output_dir=tmp_path / "one")
    two = zygote.run(
        *COMMON,
        "hardware.devices=2",
        "data.batch_size=512",
        f"paths.output_dir={tmp_path}/two",
        "logger=[csv,wandb]",  # a tracker that only rank 0 may start (offline: no network)
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "DDP" in two.stderr or "distributed" in (two.stderr + two.stdout).lower()

    loss_one, loss_two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(loss_one) == len(loss_two) == 2 * STEPS_PER_EPOCH
    assert loss_one == pytest.approx(loss_two, rel=1e-5, abs=1e-6)

    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1.keys() == m2.keys()
    for key in m1:
        assert m1[key] == pytest.approx(m2[key], abs=1e-5), key
    # only rank 0 wrote the run folder's files, and started a tracker run
    assert len(list((tmp_path / "two").glob("metrics*.json"))) == 1
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1
