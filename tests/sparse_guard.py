"""A process group that refuses sparse tensors, as NCCL does, and records every collective DDP
and its communication hook issue through it; and a test-only callback that gives it to the job's
DDP model:

    python -m train ... hardware.devices=2 \
        +callbacks.refuse_sparse._target_=tests.sparse_guard.refuse_sparse

Gloo would reduce a sparse gradient without a word, so a run on CPU cannot show that a run on
NCCL would fail; a run with this group fails where NCCL would ("sparse allreduce refused"). It
wraps the job's real (gloo) group: DDP hands it every collective of the gradient reduction
(the reducer's own all-reduce, or the hook's collectives, which take the group as their state),
and the collectives outside DDP (the loss all-reduce, metrics) go to the world group as before.

Each rank writes what went through the group to `<run folder>/collectives.<rank>.json` at the end
of fitting: [op, layout, dtype, shape, value (one-element tensors only)] per tensor.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist

REFUSED = "sparse {op} refused"


class SparseRefusingGroup(dist.ProcessGroup):
    """`inner`'s collectives, each first checked (no sparse tensor) and recorded in `log`."""

    def __init__(self, inner: dist.ProcessGroup) -> None:
        super().__init__(inner.rank(), inner.size())
        self.inner = inner
        self.log: list[list[Any]] = []

    def getBackendName(self) -> str:  # the name c10d calls
        return "sparse_refusing"

    def _check(self, op: str, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            value = tensor.item() if tensor.numel() == 1 and not tensor.is_sparse else None
            self.log.append([op, str(tensor.layout), str(tensor.dtype), list(tensor.shape), value])
            if tensor.is_sparse:
                raise RuntimeError(REFUSED.format(op=op))

    def allreduce(self, tensors: list[torch.Tensor], opts: Any) -> Any:
        self._check("allreduce", tensors)
        return self.inner.allreduce(tensors, opts)

    def allgather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any
    ) -> Any:
        self._check("allgather", inputs)
        return self.inner.allgather(outputs, inputs, opts)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> Any:
        self._check("broadcast", tensors)
        return self.inner.broadcast(tensors, opts)


def refuse_sparse() -> Any:
    """The test-only callback: builds the job's DDP model on a `SparseRefusingGroup` around the
    world group. A factory, so that importing this module (as the processes that the unit tests
    spawn do) costs torch alone, not Lightning's seconds of imports."""
    import lightning as L

    class RefuseSparse(L.Callback):
        def __init__(self) -> None:
            self.group: SparseRefusingGroup | None = None

        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            # Runs after the process group exists and before the strategy wraps the model in
            # DDP, whose keyword arguments Lightning keeps in `_ddp_kwargs`.
            if stage == "fit" and trainer.world_size > 1:
                self.group = SparseRefusingGroup(dist.group.WORLD)
                trainer.strategy._ddp_kwargs["process_group"] = self.group

        def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if self.group is not None:
                name = f"collectives.{trainer.global_rank}.json"
                with open(os.path.join(trainer.default_root_dir, name), "w") as handle:
                    json.dump(self.group.log, handle)

    return RefuseSparse()
