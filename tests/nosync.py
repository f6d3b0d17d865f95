"""A test-only guard against host synchronisation in training steps.

On a GPU, reading a tensor back to Python (`.item()`, `.tolist()`, `if tensor:`), running an op
whose output size depends on the data (`nonzero`, `unique`, boolean-mask indexing, sparse
`coalesce`) or making a tensor from Python data (`torch.tensor([...])`, a list as an index: a
blocking copy from the host) stalls the host until the device has caught up. On the CPU nothing
stalls, so the guard looks for those ops themselves: `NoHostSync` is a `TorchDispatchMode` that
records every such op it sees (and `Tensor.tolist` / `Tensor.numpy`, which on the CPU read memory
without dispatching an op), with the Python frames that issued it.

`HostSyncGuard` is a Lightning callback that holds the mode from one training step's
`on_train_batch_start` to the next one's, for every step after `after_steps` (the first steps may
set up state) except the steps whose values Lightning's logger reads (`log_every_n_steps`: the
host reads there by design), so it sees the forward, the loss, backward, the optimizer step,
every callback's batch-end hook (the progress bar's included) and the fetch of the next batch.
Epoch ends (validation, checkpoints) are outside: they are not steady-state steps.
"""

from __future__ import annotations

import traceback
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense,  # .item(), float(t), bool(t), `if t:`
    aten.nonzero,  # also boolean-mask indexing and torch.where(cond)
    aten.masked_select,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten._coalesce,  # sparse coalesce: its size is the number of distinct rows
    aten.equal,
    aten.is_nonzero,
    aten.allclose,
    # A tensor made from Python data (`torch.tensor([...])`, or a list used as an index): on a
    # GPU it is copied from pageable host memory, and that blocking copy waits for the device.
    aten.lift_fresh,
}
"""Ops whose result reaches the host (or whose output size does) before the next op can run."""


class NoHostSync(TorchDispatchMode):
    """Records syncing ops as (step, op, where) in `found`."""

    def __init__(self, step: int, found: list[tuple[int, str, str]]) -> None:
        super().__init__()
        self.step, self.found = step, found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNCING or (
            func.overloadpacket is aten.repeat_interleave and "output_size" not in (kwargs or {})
        ):
            self.record(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def record(self, what: str) -> None:
        # The callers outside torch, innermost first: the code that asked for the value.
        frames = [
            f"{'/'.join(f.filename.rsplit('/', 2)[-2:])}:{f.lineno} {f.name}"
            for f in traceback.extract_stack()
            if "/torch/" not in f.filename and not f.filename.endswith("nosync.py")
        ]
        self.found.append((self.step, what, " <- ".join(reversed(frames[-6:]))))


class HostSyncGuard(L.Callback):
    """Holds `NoHostSync` over every training step after the first `after_steps`."""

    def __init__(self, after_steps: int = 3, fail: bool = False) -> None:
        """`fail`: the run ends with an AssertionError listing the syncs (for a job run from a
        config, `+callbacks.no_host_sync._target_=tests.nosync.HostSyncGuard`)."""
        self.after_steps = after_steps
        self.fail = fail
        self.found: list[tuple[int, str, str]] = []
        self.guarded_steps = 0
        self._mode: NoHostSync | None = None
        self._reads: dict[str, Any] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._release()
        every = trainer.log_every_n_steps
        if trainer.global_step < self.after_steps or (
            every and (trainer.global_step + 1) % every == 0
        ):
            return
        self._mode = NoHostSync(trainer.global_step, self.found)
        self._mode.__enter__()
        # Host reads that dispatch no op on the CPU.
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._reads[name] = original

            def read(tensor, *args, _original=original, _name=name, **kwargs):
                if self._mode is not None:
                    self._mode.record(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, read)
        self.guarded_steps += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._release()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._release()

    def on_train_end(self, trainer, pl_module) -> None:
        self._release()
        if self.fail and (self.found or not self.guarded_steps):
            raise AssertionError(self.report())

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._release()

    def _release(self) -> None:
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self._mode = None
        for name, original in self._reads.items():
            setattr(torch.Tensor, name, original)
        self._reads.clear()

    def report(self) -> str:
        lines = {f"{what} at {where}" for _, what, where in self.found}
        return f"{len(self.found)} host syncs in {self.guarded_steps} steps:\n" + "\n".join(
            sorted(lines)
        )
