"""Expert networks for multi-task ranking, the rivals of sample weighting that recommendation
teams compare (`model=mmoe`, `model=ple`): the inputs, heads, fusion and conditions of
`train.model.MultiTaskNetwork`, with mixtures of experts between the input and each head's
tower instead of one shared trunk.

- `MMoE` (Ma et al. 2018): E expert MLPs on the input; each head mixes them with its own
  softmax gate, so heads that pull apart (click vs finish) can weigh different experts.
- `PLE` (Tang et al. 2020): every extraction level has experts of each task and shared ones;
  a task's gate mixes its own and the shared experts, the shared gate mixes all of them for the
  next level. Task experts no other head trains are what keeps one head's gradient from seesawing
  another's.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from train.config_checks import integer, require
from train.data.batch import SequenceInput
from train.errors import ConfigError
from train.model import ACTIVATIONS, MultiTaskNetwork, towers


class Experts(nn.Module):
    """`count` expert MLPs of sizes `hidden` on one input, computed together: the first layer
    of every expert is one Linear (in -> count x size), the later ones one batched matmul, so
    four experts cost four experts' arithmetic, not four rounds of small kernels.
    Output [count, rows, hidden[-1]]: expert-major, so each expert's output is one contiguous
    block that `mix` scales and adds."""

    def __init__(
        self, width: int, count: int, hidden: Sequence[int], activation: str, dropout: float
    ) -> None:
        super().__init__()
        self.count = count
        self.first = nn.Linear(width, count * hidden[0])
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for size, out in itertools.pairwise(hidden):
            # nn.Linear's own init, one per expert: each expert starts as an ordinary MLP.
            layers = [nn.Linear(size, out) for _ in range(count)]
            self.weights.append(nn.Parameter(torch.stack([x.weight.T for x in layers])))
            self.biases.append(nn.Parameter(torch.stack([x.bias for x in layers]).unsqueeze(1)))
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_first(self.first(x))

    def after_first(self, h: torch.Tensor) -> torch.Tensor:
        """The rest of the experts from their first layer's output [rows, count * size] (which
        `linears` may have computed together with other layers reading the same input)."""
        h = self.dropout(self.activation(h))
        h = h.unflatten(1, (self.count, -1)).transpose(0, 1)  # [count, rows, size]
        for weight, bias in zip(self.weights, self.biases, strict=True):
            h = self.dropout(self.activation(torch.baddbmm(bias, h, weight)))
        return h


def linears(x: torch.Tensor, layers: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """Every Linear of `layers` applied to the same `x`, as one matrix product of their
    stacked weights: one pass over `x` and one over its gradient instead of one per layer. A
    PLE level's experts and gates are many narrow layers on one input, which a CPU runs far
    below its rate for one wide product (bench/multitask.py, arm `ple 2 shared`)."""
    if len(layers) == 1:
        return [layers[0](x)]
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers])
    out = torch.nn.functional.linear(x, weight, bias)
    return list(out.split([layer.out_features for layer in layers], dim=1))


def mix(weights: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_e weights[:, e] · outputs[e] for gate weights [rows, experts] and expert outputs
    [rows, width] each: one multiply-add per expert, so the experts' outputs are never
    concatenated nor a [rows, experts, width] product materialised (each head of a PLE level
    mixes its own experts with the shared ones, which are other tensors)."""
    columns = weights.unsqueeze(-1).unbind(1)
    out = columns[0] * outputs[0]
    for column, output in zip(columns[1:], outputs[1:], strict=True):
        out = torch.addcmul(out, column, output)
    return out


def check_hidden(options: Mapping[str, Any]) -> None:
    """An expert is an MLP: an expert of no layers would pass the input through, and every
    expert (and gate) would see the same thing."""
    if not list(options["hidden"]):
        raise ConfigError("model.hidden=[]: expected the experts' layer sizes, e.g. [128]")


class MMoE(MultiTaskNetwork):
    """Multi-gate mixture of experts: `experts` MLPs of sizes `hidden` on [fields, dense], one
    softmax gate per head over the experts, then each head's tower (`head_hidden`)."""

    def __init__(
        self,
        cardinalities: Sequence[int],
        num_dense: int,
        heads: Sequence[str],
        fusion: Mapping[str, float] | None = None,
        condition: Mapping[str, str] | None = None,
        embedding_dim: int = 16,
        experts: int = 4,
        hidden: Sequence[int] = (128,),
        head_hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        activation: str = "relu",
        sparse_embeddings: bool = True,
        sequences: Sequence[SequenceInput] = (),
    ) -> None:
        self.check(locals())
        super().__init__(
            cardinalities,
            num_dense,
            heads,
            fusion,
            condition,
            embedding_dim,
            sparse_embeddings,
            sequences,
        )
        self.experts = Experts(self.input_width, experts, hidden, activation, dropout)
        # Every head's gate in one Linear: [rows, heads x experts].
        self.gates = nn.Linear(self.input_width, len(self.heads) * experts)
        self.towers = towers(len(self.heads), hidden[-1], head_hidden, activation, dropout)

    @staticmethod
    def check(options: Mapping[str, Any]) -> None:
        MultiTaskNetwork.check(options)
        require("model.experts", options["experts"], integer(1))
        check_hidden(options)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's weights over the experts [rows, heads, experts] (each row sums to 1)."""
        return self.per_head(self.gates(x))

    def per_head(self, gates: torch.Tensor) -> torch.Tensor:
        """The gates' logits [rows, heads x experts] -> each head's softmax over the experts."""
        return torch.softmax(gates.unflatten(1, (len(self.heads), -1)), dim=-1)

    def tower_logits(self, shared: torch.Tensor) -> torch.Tensor:
        # Every head mixes the same experts: one batched product for all the mixtures (`mix` per
        # head measured slower in bench/multitask.py).
        first, gates = linears(shared, [self.experts.first, self.gates])
        experts = self.experts.after_first(first).transpose(0, 1)  # [rows, experts, width]
        mixed = torch.bmm(self.per_head(gates), experts)  # [rows, heads, width]
        return torch.cat([tower(mixed[:, j]) for j, tower in enumerate(self.towers)], dim=1)


class ExtractionLevel(nn.Module):
    """One PLE level: `task_experts` experts per head and `shared_experts` shared ones; head k's
    gate mixes its own and the shared experts on its own input; the shared gate (all but the
    last level) mixes every expert on the shared input."""

    def __init__(
        self,
        width: int,
        heads: int,
        task_experts: int,
        shared_experts: int,
        hidden: Sequence[int],
        activation: str,
        dropout: float,
        last: bool,
    ) -> None:
        super().__init__()
        self.task = nn.ModuleList(
            Experts(width, task_experts, hidden, activation, dropout) for _ in range(heads)
        )
        self.shared = (
            Experts(width, shared_experts, hidden, activation, dropout) if shared_experts else None
        )
        self.task_gates = nn.ModuleList(
            nn.Linear(width, task_experts + shared_experts) for _ in range(heads)
        )
        every = heads * task_experts + shared_experts
        self.shared_gate = None if last else nn.Linear(width, every)

    def forward(
        self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        # The layers that read one input run as one product (`linears`): head k's experts and
        # gate read its input, the shared experts and gate the shared one; at the first level
        # all of these are the same tensor, so the whole level's first layers are one product.
        readers: dict[int, tuple[torch.Tensor, list[nn.Linear]]] = {}

        def reads(x: torch.Tensor, *layers: nn.Linear | None) -> None:
            readers.setdefault(id(x), (x, []))[1].extend(
                layer for layer in layers if layer is not None
            )

        for x, group, gate in zip(task_inputs, self.task, self.task_gates, strict=True):
            reads(x, group.first, gate)
        reads(shared_input, None if self.shared is None else self.shared.first, self.shared_gate)
        out: dict[nn.Linear, torch.Tensor] = {}
        for x, layers in readers.values():
            out.update(zip(layers, linears(x, layers), strict=True))

        shared = [] if self.shared is None else self.shared.after_first(out[self.shared.first])
        own = [group.after_first(out[group.first]) for group in self.task]
        task_outputs = [
            mix(torch.softmax(out[gate], dim=-1), [*mine, *shared])
            for gate, mine in zip(self.task_gates, own, strict=True)
        ]
        if self.shared_gate is None:
            return task_outputs, None
        every = [expert for mine in own for expert in mine] + list(shared)
        return task_outputs, mix(torch.softmax(out[self.shared_gate], dim=-1), every)


class PLE(MultiTaskNetwork):
    """Progressive layered extraction: `levels` extraction levels (`ExtractionLevel`), each
    expert an MLP of sizes `hidden`, then each head's tower (`head_hidden`) on its last level's
    mixture. One level with no shared experts is one expert + tower per head, nothing shared
    but the embeddings."""

    def __init__(
        self,
        cardinalities: Sequence[int],
        num_dense: int,
        heads: Sequence[str],
        fusion: Mapping[str, float] | None = None,
        condition: Mapping[str, str] | None = None,
        embedding_dim: int = 16,
        levels: int = 2,
        task_experts: int = 1,
        shared_experts: int = 2,
        hidden: Sequence[int] = (64,),
        head_hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        activation: str = "relu",
        sparse_embeddings: bool = True,
        sequences: Sequence[SequenceInput] = (),
    ) -> None:
        self.check(locals())
        super().__init__(
            cardinalities,
            num_dense,
            heads,
            fusion,
            condition,
            embedding_dim,
            sparse_embeddings,
            sequences,
        )
        widths = [self.input_width] + [hidden[-1]] * (levels - 1)
        self.levels = nn.ModuleList(
            ExtractionLevel(
                width,
                len(self.heads),
                task_experts,
                shared_experts,
                hidden,
                activation,
                dropout,
                last=i == levels - 1,
            )
            for i, width in enumerate(widths)
        )
        self.towers = towers(len(self.heads), hidden[-1], head_hidden, activation, dropout)

    @staticmethod
    def check(options: Mapping[str, Any]) -> None:
        MultiTaskNetwork.check(options)
        require("model.levels", options["levels"], integer(1))
        require("model.task_experts", options["task_experts"], integer(1))
        require("model.shared_experts", options["shared_experts"], integer(0))
        check_hidden(options)

    def tower_logits(self, shared: torch.Tensor) -> torch.Tensor:
        task_inputs: list[torch.Tensor] = [shared] * len(self.heads)
        shared_input: torch.Tensor | None = shared
        for level in self.levels:
            assert shared_input is not None  # only the last level has no shared output
            task_inputs, shared_input = level(task_inputs, shared_input)
        return torch.cat(
            [tower(x) for tower, x in zip(self.towers, task_inputs, strict=True)], dim=1
        )
