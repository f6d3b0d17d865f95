"""One GPU per run when several runs share a machine (a parallel sweep, or runs started from
several shells): `hardware=free_gpu` takes a GPU that no other upweight process holds.

A GPU is held by an exclusive `flock` on a file named after its UUID, so it is the physical
GPU that is held whatever CUDA_VISIBLE_DEVICES each process sees, and the kernel releases it
when the process ends, however it ends (no stale leases after `kill -9`). A process keeps its
GPU for its lifetime: Hydra's joblib launcher reuses its worker processes, so with
`hydra.launcher.n_jobs` ≤ the GPU count each worker settles on a GPU of its own; with more
jobs than GPUs the extra ones wait for a GPU to be released.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

LOCK_DIR = os.environ.get("UPWEIGHT_GPU_LOCKS", f"{tempfile.gettempdir()}/upweight-gpu-locks")
_held: dict[str, tuple[str, int]] = {}  # lock folder -> (key of the GPU held, open lock file)


def lease(keys: Sequence[str], lock_dir: str = LOCK_DIR, poll_s: float = 2.0) -> int:
    """Index into `keys` (one stable key per visible GPU) of a GPU that no other process
    holds, held until this process exits; the same index on every later call of this process.
    Waits while every GPU is held."""
    if not keys:
        raise ValueError("hardware=free_gpu needs a CUDA GPU and this machine has none")
    if lock_dir in _held:
        key, handle = _held[lock_dir]
        if key in keys:
            return list(keys).index(key)
        os.close(handle)  # that GPU is no longer visible to this process: let it go
        del _held[lock_dir]
    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for index, key in enumerate(keys):
            handle = os.open(f"{lock_dir}/{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(handle)
                continue
            os.ftruncate(handle, 0)
            os.write(handle, f"{os.getpid()}\n".encode())  # who holds it, for people
            _held[lock_dir] = (key, handle)
            return index
        if not waiting:
            print(
                f"free_gpu: all {len(keys)} GPUs are held by other runs ({lock_dir}); waiting",
                file=sys.stderr,
            )
            waiting = True
        time.sleep(poll_s)


def free_gpu() -> int:
    """The CUDA index of a GPU leased for this process (see `lease`)."""
    import torch

    count = torch.cuda.device_count()
    keys = [str(torch.cuda.get_device_properties(i).uuid) for i in range(count)]
    return lease(keys)
