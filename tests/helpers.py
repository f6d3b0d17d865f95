"""Checkpoints for the prediction, export and checkpoint-security tests.

`trained_run` trains one tiny real run with `python -m train` (once per test session, shared by
every module that asks); `write_checkpoint` writes a checkpoint of a freshly initialised network
in the same layout, for the fast tests that need no trained weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "hardware=cpu",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    # A scheduler and a weighted scheme put a LambdaLR state and scheme terms in the checkpoint.
    "scheduler=cosine",
    "weights=engagement",
    "data.simulator.n_train=20000",
    "data.simulator.n_val=5000",
    "data.simulator.n_test=5000",
    "data.simulator.n_users=500",
    "data.simulator.n_videos=1000",
    "data.simulator.n_authors=100",
]
_RUNS: dict[str, Path] = {}


def trained_run(tmp_path_factory: Any) -> Path:
    """The run folder of one tiny `python -m train` run (trained on first use)."""
    if "tiny" not in _RUNS:
        folder = tmp_path_factory.mktemp("trained")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "UPWEIGHT_RUNS": str(folder / "outputs")}
        done = subprocess.run(
            [sys.executable, "-m", "train", *TINY_RUN, f"paths.output_dir={folder}/run"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        _RUNS["tiny"] = folder / "run"
    return _RUNS["tiny"]


SPEC: dict[str, Any] = {
    "categorical": {"user_id": 50, "video_id": 80, "device": 10},
    "dense": ["video_len_s", "user_activity"],
    "behaviours": {"click": "click"},
    "group_key": "user_id",
}


def write_checkpoint(
    path: Path,
    target: str = "train.model.DNN",
    spec: Mapping[str, Any] | None = None,
    seed: int = 0,
    **model: Any,
) -> Path:
    """A checkpoint in the layout `python -m train` writes (state_dict with `model.*` and the
    dense statistics, `upweight` with plain types), of a randomly initialised network."""
    from train.checkpoint import build_network

    spec = dict(spec or SPEC)
    config = {"_target_": target, "_partial_": True, "hidden": [16, 8], "embedding_dim": 4}
    config |= model
    torch.manual_seed(seed)
    network = build_network(
        config, list(spec["categorical"].values()), len(spec["dense"]), "test", ["tests."]
    )
    dense = len(spec["dense"])
    mean = torch.linspace(10.0, 20.0, dense)
    std = torch.linspace(2.0, 5.0, dense)
    state = {f"model.{k}": v for k, v in network.state_dict().items()}
    state |= {"dense_mean": mean, "dense_std": std}
    torch.save(
        {
            "epoch": 0,
            "state_dict": state,
            "upweight": {
                "format": 1,
                "model": config,
                "spec": spec,
                "stats": {
                    "rows": 100,
                    "dense_mean": mean.tolist(),
                    "dense_std": std.tolist(),
                    "continuous": [],
                    "positive_rate": {"click": 0.1},
                    "behaviour_mean": {"click": 0.1},
                },
                "scheme": {"describe": "click_only", "name": "click_only", "label": "click"},
            },
        },
        path,
    )
    return path
