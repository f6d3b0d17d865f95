"""Adam for recommendation models: lazy (sparse) Adam on embedding tables, AdamW elsewhere.

Embedding tables are ~97% of a CTR model's parameters, but a batch touches a few thousand of
their rows. Dense Adam updates every row every step; `SparseAdam` updates only the touched rows
(TensorFlow's LazyAdam, the usual choice in recsys), which is what makes the step cost
independent of the bucket counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class SparseDenseAdam(torch.optim.Optimizer):
    """One optimizer (as Lightning and LR schedulers expect) over three parameter groups:
    weights that decay (AdamW), biases/norms/dense embeddings that don't, and parameters with
    sparse gradients (SparseAdam). Schedulers scale the `lr` of every group alike."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-5,
        embedding_lr: float | None = None,
    ) -> None:
        sparse, decay, no_decay = [], [], []
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
                    sparse.append(param)
                elif isinstance(module, nn.Linear) and name == "weight":
                    decay.append(param)
                else:
                    no_decay.append(param)
        betas = (float(betas[0]), float(betas[1]))
        groups = [
            {"params": decay, "weight_decay": weight_decay, "kind": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "kind": "no_decay"},
            {"params": sparse, "kind": "sparse", "lr": embedding_lr or lr},
        ]
        groups = [g for g in groups if g["params"]]
        dense_groups = [g for g in groups if g["kind"] != "sparse"]
        sparse_groups = [g for g in groups if g["kind"] == "sparse"]
        # The inner optimizers fill in their defaults on these very dicts; the outer one then
        # holds the same dicts, so an LR scheduler acting on it acts on them.
        self._inner: list[torch.optim.Optimizer] = []
        if dense_groups:
            self._inner.append(torch.optim.AdamW(dense_groups, lr=lr, betas=betas, eps=eps))
        if sparse_groups:
            self._inner.append(torch.optim.SparseAdam(sparse_groups, lr=lr, betas=betas, eps=eps))
        super().__init__(groups, defaults={"lr": lr})
        self._share_state()

    def _share_state(self) -> None:
        dense = [g for g in self.param_groups if g["kind"] != "sparse"]
        sparse = [g for g in self.param_groups if g["kind"] == "sparse"]
        for inner, own in zip(self._inner, [x for x in (dense, sparse) if x], strict=True):
            inner.param_groups = own
            inner.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share_state()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self._inner:
            inner.step()
        return loss


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100, floor: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to `floor` x the base LR over the run."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
