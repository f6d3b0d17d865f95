"""Ranking networks: plain `nn.Module`s that map (hashed ids, standardised dense features) to one
logit per impression. No Lightning, no config types: any module with this call signature plugs in
through `conf/model/` (the trainer passes `cardinalities` and `num_dense`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "prelu": nn.PReLU,
    "tanh": nn.Tanh,
}


class HashedEmbeddings(nn.Module):
    """One embedding row per hash bucket of every categorical feature, in a single table.

    One table (with per-feature offsets) makes the lookup a single kernel. With `sparse=True` the
    backward pass yields a sparse gradient holding only the rows a batch touched, so the optimizer
    and the DDP all-reduce cost scales with the batch, not with the bucket counts.
    """

    def __init__(self, cardinalities: Sequence[int], dim: int, sparse: bool = True) -> None:
        super().__init__()
        if not cardinalities:
            raise ValueError("HashedEmbeddings needs at least one categorical feature")
        offsets = torch.tensor([0, *list(cardinalities)[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.cardinalities = list(cardinalities)
        self.table = nn.Embedding(sum(cardinalities), dim, sparse=sparse)
        # Small init: with hundreds of thousands of rarely-seen rows, N(0, 1) rows would add
        # noise that dominates the first epochs.
        nn.init.normal_(self.table.weight, std=0.01)

    def forward(self, categorical: torch.Tensor) -> torch.Tensor:
        return self.table(categorical + self.offsets)


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
        embedding_l2: float = 0.0,
    ) -> None:
        super().__init__()
        self.embedding_l2 = embedding_l2
        self.penalty = torch.zeros(())
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation {activation!r} is not one of {list(ACTIVATIONS)}")
        if not 0 <= dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
        self.embeddings = HashedEmbeddings(cardinalities, embedding_dim, sparse_embeddings)
        width = len(cardinalities) * embedding_dim + num_dense
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, categorical: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        vectors = self.embeddings(categorical)
        if self.training and self.embedding_l2 > 0:
            # L2 on the rows a batch looks up (not the whole table): frequent ids are shrunk
            # as often as they are seen, rare ids - the ones that overfit - are pulled to 0.
            self.penalty = self.embedding_l2 * vectors.pow(2).sum(-1).mean()
        x = torch.cat([vectors.flatten(1), dense], dim=1)
        return self.mlp(x).squeeze(1)
