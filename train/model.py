"""Ranking networks: plain `nn.Module`s that map (ids as table rows, standardised dense features,
list columns) to one logit per impression (`MultiHead`: one per behaviour). No Lightning, no
config types: any module with this call signature plugs in through `conf/model/` (the trainer
passes `cardinalities` and `num_dense`, and `sequences` when the data has list columns)."""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train.config_checks import boolean, integer, ints, number, one_of, require
from train.data.batch import SequenceInput
from train.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "prelu": nn.PReLU,
    "tanh": nn.Tanh,
}


class FeatureEmbeddings(nn.Module):
    """Every id's embedding row (a hash bucket or a vocabulary index of each table) in one
    table, and every list column pooled into one vector: fields [rows, C + S, dim] for C
    categorical columns and S list columns (`SequenceInput`).

    One table (with per-table offsets) makes each lookup a single kernel. With `sparse=True` the
    backward pass yields a sparse gradient holding only the rows a batch touched, so the optimizer
    and the DDP all-reduce cost scales with the batch, not with the table sizes. Lists are
    pooled without a loop over rows: `mean` and `sum` in one `embedding_bag` per list column
    (padding weighs 0), `attention` as DIN's target attention (a small MLP scores each element
    against the candidate's embedding from the same table; the weighted sum, weights not
    normalised, as in DIN).
    A row whose list is empty or null pools to zeros.
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        dim: int,
        sparse: bool = True,
        sequences: Sequence[SequenceInput | Mapping[str, Any]] = (),
        attention_hidden: int = 32,
    ) -> None:
        super().__init__()
        self.sequences = [
            s if isinstance(s, SequenceInput) else SequenceInput(**s) for s in sequences
        ]
        self.num_categorical = len(cardinalities) - sum(s.own_table for s in self.sequences)
        if not cardinalities:
            raise ConfigError(
                "data.categorical={}: expected at least one categorical feature column "
                "(column -> hash buckets): the network embeds ids"
            )
        offsets = torch.tensor([0, *list(cardinalities)[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.cardinalities = list(cardinalities)
        self.dim = dim
        self.table = nn.Embedding(sum(cardinalities), dim, sparse=sparse)
        # Small init: with hundreds of thousands of rarely-seen rows, N(0, 1) rows would add
        # noise that dominates the first epochs.
        nn.init.normal_(self.table.weight, std=0.01)
        self.attention = nn.ModuleDict(
            {
                str(i): nn.Sequential(
                    nn.Linear(4 * dim, attention_hidden), nn.ReLU(), nn.Linear(attention_hidden, 1)
                )
                for i, s in enumerate(self.sequences)
                if s.pooling == "attention"
            }
        )
        bounds = torch.tensor([0, *[s.max_len for s in self.sequences]]).cumsum(0).tolist()
        self.slices = list(itertools.pairwise(bounds))

    @property
    def num_fields(self) -> int:
        return self.num_categorical + len(self.sequences)

    def forward(
        self, categorical: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        fields = self.table(categorical + self.offsets[: self.num_categorical])
        if not self.sequences:
            return fields
        if sequences is None:
            raise ValueError("this network pools list columns: expected `sequences`")
        pooled = [
            self._pool(i, spec, sequences[:, a:b], fields)
            for i, (spec, (a, b)) in enumerate(zip(self.sequences, self.slices, strict=True))
        ]
        return torch.cat([fields, torch.stack(pooled, dim=1)], dim=1)

    def _pool(
        self, i: int, spec: SequenceInput, local: torch.Tensor, fields: torch.Tensor
    ) -> torch.Tensor:
        present = local > 0  # 0: padding or a null element
        rows = local + self.offsets[spec.table]
        if spec.pooling != "attention":
            weight = present.to(self.table.weight.dtype)
            if spec.pooling == "mean":
                weight = weight / weight.sum(1, keepdim=True).clamp(min=1)
            return F.embedding_bag(
                rows,
                self.table.weight,
                mode="sum",
                per_sample_weights=weight,
                sparse=self.table.sparse,
            )
        keys = self.table(rows)  # [rows, L, dim]
        query = fields[:, spec.candidate].unsqueeze(1).expand_as(keys)
        scores = self.attention[str(i)](
            torch.cat([keys, query, keys * query, keys - query], dim=-1)
        ).squeeze(-1)
        # DIN's weights are not normalised (no softmax): how much of the history relates to the
        # candidate is itself the signal, and a softmax would scale every row's weights to 1.
        weight = scores * present
        return (weight.unsqueeze(-1) * keys).sum(1)


def network_logits(
    network: nn.Module,
    categorical: torch.Tensor,
    dense: torch.Tensor,
    sequences: torch.Tensor | None = None,
) -> torch.Tensor:
    """Call a ranking network; `sequences` only when the data has list columns, so a network
    written before them (two arguments) still plugs in without."""
    if sequences is None:
        return network(categorical, dense)
    return network(categorical, dense, sequences)


HashedEmbeddings = FeatureEmbeddings
"""The name before list columns joined (networks written against it keep working)."""


class DNN(nn.Module):
    """Embeddings of hashed ids + dense inputs -> MLP -> one logit (the classic CTR DNN)."""

    def __init__(
        self,
        cardinalities: Sequence[int],
        num_dense: int,
        embedding_dim: int = 16,
        hidden: Sequence[int] = (256, 128, 64),
        dropout: float = 0.0,
        activation: str = "relu",
        sparse_embeddings: bool = True,
        sequences: Sequence[SequenceInput] = (),
    ) -> None:
        super().__init__()
        check_options(embedding_dim, hidden, dropout, activation, sparse_embeddings)
        self.embeddings = FeatureEmbeddings(
            cardinalities, embedding_dim, sparse_embeddings, sequences
        )
        width = self.embeddings.num_fields * embedding_dim + num_dense
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """The `model` config's values, checked without building the network."""
        check_config({**config, "_target_": "train.model.DNN"})

    def forward(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = torch.cat([self.embeddings(categorical, sequences).flatten(1), dense], dim=1)
        return self.mlp(x).squeeze(1)


class MultiHead(nn.Module):
    """Shared bottom + one small head per behaviour -> logits [rows, heads] (`model=multihead`).

    The shared bottom is the DNN's hashed embeddings + dense inputs, then an MLP trunk of sizes
    `hidden` (may be empty); each head is an MLP tower (`head_hidden`) on the bottom's output,
    trained on its own behaviour. The ranking score fuses the heads:
    Σ_b α_b·log p_b with α from `fusion` (heads left out weigh 0; None: the first head alone).
    `score` returns exp of that, Π_b p_b^α_b, for prediction and export.
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        num_dense: int,
        heads: Sequence[str],
        fusion: Mapping[str, float] | None = None,
        embedding_dim: int = 16,
        hidden: Sequence[int] = (256, 128, 64),
        head_hidden: Sequence[int] = (32,),
        dropout: float = 0.0,
        activation: str = "relu",
        sparse_embeddings: bool = True,
        sequences: Sequence[SequenceInput] = (),
    ) -> None:
        super().__init__()
        if isinstance(heads, str) or not isinstance(heads, Sequence):
            raise ConfigError(f"model.heads={heads!r}: expected a list of behaviour names")
        self.heads = [str(h) for h in heads]
        if not self.heads or len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"model.heads must name distinct behaviours, got {self.heads}")
        check_options(embedding_dim, hidden, dropout, activation, sparse_embeddings)
        require("model.head_hidden", head_hidden, ints(1))
        self.fusion = check_fusion(fusion, self.heads)
        # Not persistent: the fusion is a choice at scoring time, not a learned weight, so a
        # checkpoint can be scored or warm-started under another fusion.
        alpha = torch.tensor([self.fusion.get(h, 0.0) for h in self.heads], dtype=torch.float32)
        self.register_buffer("alpha", alpha, persistent=False)
        self.embeddings = FeatureEmbeddings(
            cardinalities, embedding_dim, sparse_embeddings, sequences
        )

        def mlp(width: int, sizes: Sequence[int]) -> tuple[list[nn.Module], int]:
            layers: list[nn.Module] = []
            for size in sizes:
                layers += [nn.Linear(width, size), ACTIVATIONS[activation](), nn.Dropout(dropout)]
                width = size
            return layers, width

        layers, width = mlp(self.embeddings.num_fields * embedding_dim + num_dense, hidden)
        self.trunk = nn.Sequential(*layers)
        towers = []
        for _ in self.heads:
            layers, out = mlp(width, head_hidden)
            towers.append(nn.Sequential(*layers, nn.Linear(out, 1)))
        self.towers = nn.ModuleList(towers)

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """The `model` config's values, checked without building the network."""
        check_config({**config, "_target_": "train.model.MultiHead"})

    def forward(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        fields = self.embeddings(categorical, sequences).flatten(1)
        x = self.trunk(torch.cat([fields, dense], dim=1))
        return torch.cat([tower(x) for tower in self.towers], dim=1)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Π_b p_b^α_b from logits [rows, heads]: the fused ranking score (log-sigmoid keeps
        it finite where a probability would round to 0)."""
        return torch.exp((F.logsigmoid(logits.float()) * self.alpha).sum(1))


def check_options(
    embedding_dim: int,
    hidden: Sequence[int],
    dropout: float,
    activation: str,
    sparse_embeddings: bool,
) -> None:
    """The options both networks share, each in its domain (`model.<key>=<value>: expected`)."""
    require("model.embedding_dim", embedding_dim, integer(1))
    require("model.hidden", hidden, ints(1))
    require("model.dropout", dropout, number(0.0, 1.0, high_open=True))
    require("model.activation", activation, one_of(*ACTIVATIONS))
    require("model.sparse_embeddings", sparse_embeddings, boolean())


def check_config(config: Mapping[str, Any]) -> None:
    """A `model` config of `DNN` or `MultiHead`, checked without building the network (so a
    bad value stops the job before the data is read). Keys left out take their defaults."""
    target = str(config.get("_target_", ""))
    kind = MultiHead if target.endswith("MultiHead") else DNN
    defaults = {
        name: p.default
        for name, p in inspect.signature(kind.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    options = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    check_options(
        options["embedding_dim"],
        options["hidden"],
        options["dropout"],
        options["activation"],
        options["sparse_embeddings"],
    )
    if kind is MultiHead:
        require("model.head_hidden", options["head_hidden"], ints(1))
        heads = config.get("heads")
        if isinstance(heads, str) or not isinstance(heads, Sequence):
            raise ConfigError(f"model.heads={heads!r}: expected a list of behaviour names")
        names = [str(h) for h in heads]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"model.heads must name distinct behaviours, got {names}")
        check_fusion(options["fusion"], names)


def check_fusion(fusion: Mapping[str, float] | None, heads: Sequence[str]) -> dict[str, float]:
    """`model.fusion` -> {head: α} with every α finite and one non-zero (None: first head)."""
    if fusion is None:
        return {heads[0]: 1.0}
    if not isinstance(fusion, Mapping):
        raise ConfigError(
            f"model.fusion={fusion!r}: expected a mapping head -> weight, e.g. {{click: 1}}"
        )
    out: dict[str, float] = {}
    for head, alpha in dict(fusion).items():
        if head not in heads:
            raise ConfigError(f"model.fusion names {head!r}, which is not a head {list(heads)}")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not math.isfinite(alpha)
        ):
            raise ConfigError(f"model.fusion.{head} must be a finite number, got {alpha!r}")
        out[str(head)] = float(alpha)
    if not any(out.values()):
        raise ConfigError(f"model.fusion {out} weighs every head 0: give one head a weight")
    return out
