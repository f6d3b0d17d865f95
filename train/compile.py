"""`compile=tower`: `torch.compile` of the network's dense tower, in place, for training.

The tower is every part of the network but its embedding table: the MLP after the lookup
(`DNN.mlp`; `MultiHead.trunk` and each of `MultiHead.towers`). The table stays eager: its
sparse gradient is not something inductor generates, and the lookup is one kernel already.
Each part's `forward` is replaced, on that instance, by its `torch.compile`d self: what the
module holds is unchanged, so parameter names, `state_dict` keys and checkpoints are those of an
eager run, and a checkpoint of a compiled run scores, warm-starts and exports (`torch.export`)
as any other. (`nn.Module.compile()` would be the documented in-place way, but for built-in
modules such as `nn.Sequential` torch 2.13 skips the frame it compiles and silently runs eager:
pytorch/pytorch#150915.) The eager `forward` comes back when fit ends, so nothing that copies the
network later (a deepcopy would keep calling the original's compiled forward) sees the swap.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn

from train.config_checks import COMPILE_MODES, boolean, one_of, optional, require

log = logging.getLogger(__name__)


def tower_parts(network: nn.Module) -> list[nn.Module]:
    """The dense parts of `network`: its children holding no embedding table, with containers
    (ModuleList, ModuleDict: never called themselves) opened, and parts without parameters
    (an empty `MultiHead.trunk`) left out."""
    parts: list[nn.Module] = []
    for child in network.children():
        if any(isinstance(m, nn.Embedding | nn.EmbeddingBag) for m in child.modules()):
            continue
        if isinstance(child, nn.ModuleList | nn.ModuleDict):
            parts += [m for m in child.children() if any(True for _ in m.parameters())]
        elif any(True for _ in child.parameters()):
            parts.append(child)
    return parts


class CompileTower(L.Callback):
    """Compiles the dense tower of the module's network (`pl_module.model`) when fit starts.

    `mode`: torch.compile's mode (`max-autotune-no-cudagraphs` tunes matmul kernels, minutes of
    compilation; `reduce-overhead` and `max-autotune` add CUDA graphs, which need fixed
    shapes). `dynamic`: torch.compile's `dynamic`; null compiles for the first batch size and
    recompiles once with a symbolic batch size when another one comes (the epoch's last batch,
    validation), `true` starts symbolic (one compilation fewer), `false` recompiles per size.

    Compiled at `on_fit_start`: after the strategy has wrapped the module in DDP (in place, the
    DDP model's parameters are the same objects, so its gradient hooks see the compiled
    backward's gradients); fit's validations run compiled too (a graph without autograd, compiled
    at the first), the evaluation after fit eager.
    """

    def __init__(self, mode: str = "default", dynamic: bool | None = None) -> None:
        require("callbacks.compile.mode", mode, one_of(*COMPILE_MODES))
        require("callbacks.compile.dynamic", dynamic, optional(boolean()))
        self.mode = mode
        self.dynamic = dynamic
        self._parts: list[nn.Module] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        network = getattr(pl_module, "model", None)
        parts = tower_parts(network) if isinstance(network, nn.Module) else []
        if not parts:
            log.warning("compile=tower: the network has no dense part to compile; running eager")
            return
        options: dict[str, Any] = {"mode": self.mode, "dynamic": self.dynamic}
        for part in parts:
            part.forward = torch.compile(part.forward, **options)
        self._parts = parts

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for part in self._parts:
            del part.forward  # the instance's compiled forward: the class's eager one is back
        self._parts = []
