"""`hardware=free_gpu`: each process of a parallel sweep holds a GPU of its own (tested with
real processes and made-up GPU keys: the locking does not need a GPU)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train
from train import gpus, resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF = Path(train.__file__).resolve().parent / "conf"  # the configs the package ships
HOLDER = """
import sys
from train import gpus
keys, lock_dir = sys.argv[1].split(","), sys.argv[2]
print(gpus.lease(keys, lock_dir, poll_s=0.05), flush=True)
assert gpus.lease(keys, lock_dir) == gpus.lease(keys, lock_dir)  # kept for the process
sys.stdin.read()  # hold it until told to go
"""


def holder(keys: str, lock_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, keys, str(lock_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def test_each_process_gets_its_own_gpu_and_the_next_waits_for_one(tmp_path):
    first, second = holder("gpu-a,gpu-b", tmp_path), holder("gpu-a,gpu-b", tmp_path)
    leased = {int(first.stdout.readline()), int(second.stdout.readline())}
    assert leased == {0, 1}

    third = holder("gpu-a,gpu-b", tmp_path)
    time.sleep(1.0)
    assert third.poll() is None, "both GPUs are held: it waits"
    first.kill()  # as kill -9 would: the kernel releases the lock
    first.wait()
    assert int(third.stdout.readline()) in leased  # the GPU the first one held
    _, said = third.communicate("")
    assert "all 2 GPUs are held by other runs" in said and third.returncode == 0
    second.communicate("")
    assert second.returncode == 0


def test_the_gpu_is_keyed_by_identity_not_by_index(tmp_path):
    # Two processes that see the same physical GPU under different indices
    # (CUDA_VISIBLE_DEVICES=1,0 vs 0,1) never share it.
    first = holder("gpu-a,gpu-b", tmp_path)
    assert int(first.stdout.readline()) == 0  # gpu-a
    second = holder("gpu-a,gpu-b", tmp_path)
    assert int(second.stdout.readline()) == 1  # gpu-b
    first.communicate("")
    reordered = holder("gpu-b,gpu-a", tmp_path)
    assert int(reordered.stdout.readline()) == 1, "gpu-a again, index 1 in this process"
    for process in (second, reordered):
        process.communicate("")


def test_no_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="hardware=free_gpu needs a CUDA GPU"):
        gpus.lease([], str(tmp_path))


def test_free_gpu_config_composes_to_one_leased_device():
    resolvers.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hardware=free_gpu"])
    assert cfg.hardware.strategy == "auto" and cfg.hardware.accelerator == "gpu"
    node = OmegaConf.to_container(cfg.hardware, resolve=False)["devices"]
    assert node == ["${free_gpu:}"]
