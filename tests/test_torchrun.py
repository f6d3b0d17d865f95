"""Two nodes simulated on one host: two `torchrun --nnodes 2` agents on loopback (c10d
rendezvous), one training process each, DDP over gloo; Lightning sees TorchElasticEnvironment.
With `sharding=torchrec` too: the tables sharded across the nodes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from tests.conftest import free_port
from tests.helpers import ENV, TINY


@pytest.mark.ddp
@pytest.mark.parametrize(
    "sharding",
    [
        "none",
        pytest.param(  # the tables sharded over the two nodes (TorchRec's all-to-all on gloo)
            "torchrec",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torchrec") is None, reason="optional torchrec absent"
            ),
        ),
    ],
)
def test_two_torchrun_nodes_train_one_run(tmp_path, sharding):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    run = tmp_path / "run"
    nodes = []
    for node in range(2):
        command = [
            torchrun,
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={run_id}",
            # A node whose peer never comes fails in 15 s, not after the default 600 s.
            "--rdzv-conf=join_timeout=15",
            "-m",
            "train",
            *TINY,
            "data.batch_size=512",  # per process: the global batch is 1024
            "trainer.max_epochs=1",
            "hardware.num_nodes=2",
            "hardware.strategy=ddp",
            f"sharding={sharding}",
            f"paths.output_dir={run}",  # one folder on the "shared filesystem" for both
        ]
        env = {**os.environ, **ENV, "UPWEIGHT_RUNS": str(tmp_path / f"outputs{node}")}
        nodes.append(
            subprocess.Popen(
                command,
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    for node, (process, out) in enumerate(zip(nodes, outs, strict=True)):
        assert process.returncode == 0, f"node {node}:\n{out[-4000:]}"
        # Seen without destroy_process_group() at exit: rank 0 aborting in the C++ teardown.
        assert "terminate called" not in out, out[-2000:]
    both = "\n".join(outs)
    assert "MEMBER: 1/2" in both and "MEMBER: 2/2" in both, both[-3000:]

    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.5 < metrics["test/click/auc"] <= 1.0
    rows = json.loads((run / "stats.json").read_text())["rows"]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == -(-rows // 1024)  # one epoch of global batches of 2 x 512
    assert len(list(run.glob("metrics*.json"))) == 1  # only rank 0 wrote
