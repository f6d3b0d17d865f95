"""Ranking networks: plain `nn.Module`s that map (ids as table rows, standardised dense features,
list columns) to one logit per impression (`MultiHead`: one per behaviour). No Lightning, no
config types: any module with this call signature plugs in through `conf/model/` (the trainer
passes `cardinalities` and `num_dense`, and `sequences` when the data has list columns).

Longer than 450 lines: the networks of `conf/model/` (`DNN`, `DCN`, `DeepFM`, `MultiHead`) live
here beside the embeddings, the multi-task base (`MultiTaskNetwork`: heads, fusion, conditions)
and the option checks they share; the expert networks built on that base (`MMoE`, `PLE`) are in
`train.multitask`."""

from __future__ import annotations

import importlib
import inspect
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train.balance import check_balance
from train.config_checks import (
    TRAINING_KEYS,
    boolean,
    integer,
    ints,
    number,
    one_of,
    optional,
    require,
)
from train.data.batch import SequenceInput
from train.errors import ConfigError
from train.host import take_columns
from train.weights import check_head_weights

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "prelu": nn.PReLU,
    "tanh": nn.Tanh,
}


class Embeddings(nn.Module):
    """What a network reads its fields from: `lookup` gives (fields [rows, num_fields, dim],
    first-order scalars or None), `forward` the fields alone. `FeatureEmbeddings` holds the
    tables whole; `train.sharded_embeddings.TorchRecEmbeddings` sharded over the ranks."""

    @property
    def num_fields(self) -> int:
        raise NotImplementedError

    def forward(
        self, categorical: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.lookup(categorical, sequences)[0]

    def lookup(
        self, categorical: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class FeatureEmbeddings(Embeddings):
    """Every id's embedding row (a hash bucket or a vocabulary index of each table) in one
    table, and every list column pooled into one vector: fields [rows, C + S, dim] for C
    categorical columns and S list columns (`SequenceInput`).

    One table (with per-table offsets) makes each lookup a single kernel. With `sparse=True` the
    backward pass yields a sparse gradient holding only the rows a batch touched, so the optimizer
    and the DDP all-reduce cost scales with the batch, not with the table sizes. Lists are
    pooled without a loop over rows: `mean` and `sum` in one `embedding_bag` per list column
    (padding weighs 0), `attention` as DIN's target attention (a small MLP scores each element
    against the candidate's embedding from the same table; the weighted sum, weights not
    normalised, as in DIN). The ids, the attention keys and the bags are looked up in one call
    (`_TableLookup`), so the table's gradient is one sparse tensor.
    A row whose list is empty or null pools to zeros.
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        dim: int,
        sparse: bool = True,
        sequences: Sequence[SequenceInput] = (),
        attention_hidden: int = 32,
        first_order: bool = False,
    ) -> None:
        super().__init__()
        self.sequences = list(sequences)
        self.num_categorical = len(cardinalities) - sum(s.own_table for s in self.sequences)
        if not cardinalities:
            raise ConfigError(
                "data.categorical={}: expected at least one categorical feature column "
                "(column -> hash buckets): the network embeds ids"
            )
        offsets = torch.tensor([0, *list(cardinalities)[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(sum(cardinalities), dim, sparse=sparse)
        # Small init: with hundreds of thousands of rarely-seen rows, N(0, 1) rows would add
        # noise that dominates the first epochs.
        nn.init.normal_(self.table.weight, std=0.01)
        # One scalar per table row with the same offsets (DeepFM's first-order term). An
        # nn.Embedding of its own, sparse like the main table, so SparseDenseAdam puts it in
        # the lazy group; zeros: a row the data never shows adds nothing.
        self.first_order = (
            nn.Embedding(sum(cardinalities), 1, sparse=sparse) if first_order else None
        )
        if self.first_order is not None:
            nn.init.zeros_(self.first_order.weight)
        self.attention = nn.ModuleDict(
            {
                str(i): nn.Sequential(
                    nn.Linear(4 * dim, attention_hidden), nn.ReLU(), nn.Linear(attention_hidden, 1)
                )
                for i, s in enumerate(self.sequences)
                if s.pooling == "attention"
            }
        )
        self.slices_len = [s.max_len for s in self.sequences]
        bounds = torch.tensor([0, *self.slices_len]).cumsum(0).tolist()
        self.slices = list(itertools.pairwise(bounds))

    @property
    def num_fields(self) -> int:
        return self.num_categorical + len(self.sequences)

    def lookup(
        self, categorical: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fields [rows, num_fields, dim], first-order scalars [rows, num_fields] or None
        without `first_order`): a list column's scalar is pooled with its vector's weights."""
        rows = categorical + self.offsets[: self.num_categorical]
        if not self.sequences:
            scalars = None if self.first_order is None else self.first_order(rows).squeeze(-1)
            return self.table(rows), scalars
        if sequences is None:
            raise ValueError("this network pools list columns: expected `sequences`")
        lists = [sequences[:, a:b] for a, b in self.slices]
        present = [local > 0 for local in lists]  # 0: padding or a null element
        list_rows = [
            local + self.offsets[spec.table]
            for spec, local in zip(self.sequences, lists, strict=True)
        ]
        attention = [i for i, s in enumerate(self.sequences) if s.pooling == "attention"]
        bags = [i for i, s in enumerate(self.sequences) if s.pooling != "attention"]
        bag_weights = {}
        for i in bags:
            weight = present[i].to(self.table.weight.dtype)
            if self.sequences[i].pooling == "mean":
                weight = weight / weight.sum(1, keepdim=True).clamp(min=1)
            bag_weights[i] = weight
        # One call for the whole table, so its gradient is one sparse tensor: several lookups
        # of one table would each bring their own, and autograd's sum of sparse gradients
        # costs ~6x their concatenation on the CPU (for batch x history-length entries).
        widths = [self.num_categorical, *(self.sequences[i].max_len for i in attention)]
        singles, *pooled_bags = _TableLookup.apply(
            self.table.weight,
            self.table.sparse,
            torch.cat([rows, *(list_rows[i] for i in attention)], dim=1),
            *itertools.chain.from_iterable((list_rows[i], bag_weights[i]) for i in bags),
        )
        fields, *keys_of = torch.split(singles, widths, dim=1)
        pooled: dict[int, torch.Tensor] = dict(zip(bags, pooled_bags, strict=True))
        for i, keys in zip(attention, keys_of, strict=True):  # keys: [rows, L, dim]
            query = fields[:, self.sequences[i].candidate].unsqueeze(1).expand_as(keys)
            scores = self.attention[str(i)](
                torch.cat([keys, query, keys * query, keys - query], dim=-1)
            ).squeeze(-1)
            # DIN's weights are not normalised (no softmax): how much of the history relates to
            # the candidate is itself the signal; a softmax would scale every row's weights to 1.
            bag_weights[i] = scores * present[i]
            pooled[i] = (bag_weights[i].unsqueeze(-1) * keys).sum(1)
        order = range(len(self.sequences))
        fields = torch.cat([fields, torch.stack([pooled[i] for i in order], dim=1)], dim=1)
        if self.first_order is None:
            return fields, None
        # [rows, L] scalars, pooled with the vectors' weights; one lookup, one gradient.
        first = self.first_order(torch.cat([rows, *list_rows], dim=1)).squeeze(-1)
        scalars, *elements = torch.split(first, [self.num_categorical, *self.slices_len], dim=1)
        pooled_scalars = [(bag_weights[i] * elements[i]).sum(1) for i in order]
        return fields, torch.cat([scalars, torch.stack(pooled_scalars, dim=1)], dim=1)


class _TableLookup(torch.autograd.Function):
    """Rows of one table, some looked up one by one (`singles`, [rows, K]) and some pooled as
    weighted sums of fixed-width bags (pairs of [rows, L] rows and weights, no gradient to the
    weights), with one gradient for the table: the entries of every lookup concatenated (a
    row-sparse tensor like `nn.Embedding`'s, one entry per looked-up id) or, for a dense
    table, summed into its shape. Forward: `embedding` and `embedding_bag`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, weight: torch.Tensor, sparse: bool, singles: torch.Tensor, *bags: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.sparse, ctx.shape = sparse, weight.shape
        ctx.save_for_backward(singles, *bags)
        pooled = [
            F.embedding_bag(rows, weight, mode="sum", per_sample_weights=w)
            for rows, w in zip(bags[::2], bags[1::2], strict=True)
        ]
        return (F.embedding(singles, weight), *pooled)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        singles, *bags = ctx.saved_tensors
        dim = ctx.shape[1]
        indices = [singles.reshape(-1)]
        values = [grads[0].reshape(-1, dim)]
        for rows, w, grad in zip(bags[::2], bags[1::2], grads[1:], strict=True):
            indices.append(rows.reshape(-1))
            values.append((w.unsqueeze(-1) * grad.unsqueeze(1)).reshape(-1, dim))
        index, value = torch.cat(indices), torch.cat(values)
        if ctx.sparse:
            table = torch.sparse_coo_tensor(
                index.unsqueeze(0), value, ctx.shape, check_invariants=False
            )
        else:
            table = value.new_zeros(ctx.shape).index_add_(0, index, value)
        return (table, None, None, *([None] * len(bags)))


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


SHARED_OPTIONS = ("embedding_dim", "hidden", "dropout", "activation", "sparse_embeddings")
"""The options every network here takes (`check_options`)."""


class RankingNetwork(nn.Module):
    """What the networks here share: a `model` config checked without building the network
    (so a bad value stops the job before the data is read), each key left out taking the
    default of the class's own signature; `__init__` runs the same `check` on its arguments
    (its `locals()`)."""

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """The `model` config's values, checked without building the network."""
        cls.check(options_of(cls, config))

    @staticmethod
    def check(options: Mapping[str, Any]) -> None:
        """Every option in its domain (`model.<key>=<value>: expected ...`)."""
        check_options(*(options[k] for k in SHARED_OPTIONS))


def options_of(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments `cls` would be built with from `config`: its keys that name a parameter,
    over the defaults of the class's signature."""
    parameters = inspect.signature(cls.__init__).parameters
    defaults = {
        name: p.default
        for name, p in parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **{k: v for k, v in config.items() if k in parameters}}


def mlp(
    width: int, sizes: Sequence[int], activation: str, dropout: float
) -> tuple[list[nn.Module], int]:
    """Linear + activation + dropout per size: the layers and their output width."""
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [nn.Linear(width, size), ACTIVATIONS[activation](), nn.Dropout(dropout)]
        width = size
    return layers, width


def towers(
    heads: int, width: int, hidden: Sequence[int], activation: str, dropout: float
) -> nn.ModuleList:
    """One MLP tower per head ending in its logit."""
    out = []
    for _ in range(heads):
        layers, last = mlp(width, hidden, activation, dropout)
        out.append(nn.Sequential(*layers, nn.Linear(last, 1)))
    return nn.ModuleList(out)


class DNN(RankingNetwork):
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
        self.check(locals())
        self.embeddings = FeatureEmbeddings(
            cardinalities, embedding_dim, sparse_embeddings, sequences
        )
        layers, width = mlp(
            self.embeddings.num_fields * embedding_dim + num_dense, hidden, activation, dropout
        )
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = torch.cat([self.embeddings(categorical, sequences).flatten(1), dense], dim=1)
        return self.mlp(x).squeeze(1)


class CrossNetwork(nn.Module):
    """DCN-v2's cross layers: x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l, each layer one degree of
    explicit feature interaction more (x_L holds every product of up to L + 1 inputs) at the
    cost of a matrix product. `rank`: W_l = U_l V_lᵀ with U, V of `rank` columns (the paper's
    low-rank cross, for wide inputs where width² weights are too many); None: full W_l."""

    def __init__(self, width: int, layers: int, rank: int | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(width, width)
            if rank is None
            else nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width))
            for _ in range(layers)
        )
        for layer in self.layers:
            # b = 0 as in the paper: a layer starts as x0 ⊙ W x, a product of inputs, not a shift.
            nn.init.zeros_(layer.bias if isinstance(layer, nn.Linear) else layer[1].bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class DCN(RankingNetwork):
    """DCN-v2 (Wang et al. 2021): x0 = [flattened fields, dense]; a `CrossNetwork` of
    `cross_layers` on x0 beside an MLP (`hidden`) on x0, a linear layer on both outputs -> one
    logit (`structure: parallel`); `stacked` runs the MLP on the cross network's output instead.
    The cross layers learn the bounded-degree products of features (user x video x hour) that
    an MLP only approximates; the MLP keeps the rest."""

    def __init__(
        self,
        cardinalities: Sequence[int],
        num_dense: int,
        embedding_dim: int = 16,
        hidden: Sequence[int] = (256, 128, 64),
        cross_layers: int = 2,
        cross_rank: int | None = None,
        structure: str = "parallel",
        dropout: float = 0.0,
        activation: str = "relu",
        sparse_embeddings: bool = True,
        sequences: Sequence[SequenceInput] = (),
    ) -> None:
        super().__init__()
        self.check(locals())
        self.embeddings = FeatureEmbeddings(
            cardinalities, embedding_dim, sparse_embeddings, sequences
        )
        width = self.embeddings.num_fields * embedding_dim + num_dense
        self.stacked = structure == "stacked"
        self.cross = CrossNetwork(width, cross_layers, cross_rank)
        layers, out = mlp(width, hidden, activation, dropout)
        self.mlp = nn.Sequential(*layers)
        # Registered last: warm start shifts the bias of the network's last Linear.
        self.output = nn.Linear(out if self.stacked else width + out, 1)

    @staticmethod
    def check(options: Mapping[str, Any]) -> None:
        RankingNetwork.check(options)
        require("model.cross_layers", options["cross_layers"], integer(1))
        require("model.cross_rank", options["cross_rank"], optional(integer(1)))
        require("model.structure", options["structure"], one_of("parallel", "stacked"))

    def forward(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        x0 = torch.cat([self.embeddings(categorical, sequences).flatten(1), dense], dim=1)
        cross = self.cross(x0)
        if self.stacked:
            return self.output(self.mlp(cross)).squeeze(1)
        return self.output(torch.cat([cross, self.mlp(x0)], dim=1)).squeeze(1)


def fm_interaction(fields: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} <v_i, v_j> per row of fields [rows, n, dim], in O(n·dim) as
    0.5·Σ_d((Σ_i v_id)² − Σ_i v_id²) (Rendle's identity) -> [rows]."""
    return 0.5 * (fields.sum(1).square() - fields.square().sum(1)).sum(-1)


class DeepFM(RankingNetwork):
    """DeepFM (Guo et al. 2017): logit = first order + FM second order + deep MLP, all on the
    same embeddings. First order: a learned scalar per embedding-table row (a second, 1-wide
    table, sparse like the first; a list column's scalars pooled with its vectors' weights)
    plus a linear layer on the dense features. Second order: the pairwise dot products of every
    field (the ids' embeddings, the pooled lists, and each dense feature as x_j·v_j with a
    learned v_j). Deep: an MLP (`hidden`) on [flattened fields, dense], as `DNN`'s."""

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
        self.check(locals())
        self.embeddings = FeatureEmbeddings(
            cardinalities, embedding_dim, sparse_embeddings, sequences, first_order=True
        )
        # Small like the table's rows: dense inputs are standardised, so x_j·v_j starts small.
        self.dense_fields = nn.Parameter(torch.randn(num_dense, embedding_dim) * 0.01)
        # The dense features' first order; the deep MLP's output bias is the global bias (and
        # no Linear of width 0 without dense features).
        self.linear = nn.Linear(num_dense, 1, bias=False) if num_dense else None
        layers, width = mlp(
            self.embeddings.num_fields * embedding_dim + num_dense, hidden, activation, dropout
        )
        # Last: warm start shifts the bias of the network's last Linear (a sum: any bias works).
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        fields, scalars = self.embeddings.lookup(categorical, sequences)
        assert scalars is not None  # built with first_order=True
        every = torch.cat([fields, dense.unsqueeze(-1) * self.dense_fields], dim=1)
        deep = self.mlp(torch.cat([fields.flatten(1), dense], dim=1)).squeeze(1)
        first = scalars.sum(1)
        if self.linear is not None:
            first = first + self.linear(dense).squeeze(1)
        return first + fm_interaction(every) + deep


def network_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `model` config without `TRAINING_KEYS`: what builds the network."""
    return {k: v for k, v in config.items() if k not in TRAINING_KEYS}


class MultiTaskNetwork(RankingNetwork):
    """What every network with a head per behaviour shares (`MultiHead` here, `MMoE` and `PLE`
    in `train.multitask`): `DNN`'s embeddings, heads by name, the fusion of their scores, and
    ESMM-style conditions. Its forward is `head_logits(shared(...))`: loss balancing measures
    each head's gradient at the shared representation (`train.balance.GradNorm`).

    `condition` ({finish: click}): the finish head's own logit is p(finish | click), and the
    network outputs the logit of p(finish) = p(click)·p(finish | click) (Ma et al. 2018,
    ESMM), so its loss is the whole impression space's while the conditional head only learns
    what a click leaves open. Chains (like: finish, finish: click) multiply down the chain."""

    def __init__(
        self,
        cardinalities: Sequence[int],
        num_dense: int,
        heads: Sequence[str],
        fusion: Mapping[str, float] | None,
        condition: Mapping[str, str] | None,
        embedding_dim: int,
        sparse_embeddings: bool,
        sequences: Sequence[SequenceInput],
    ) -> None:
        super().__init__()
        self.heads = [str(h) for h in heads]
        self.fusion = check_fusion(fusion, self.heads)
        self.condition = check_condition(condition, self.heads)
        # Not persistent: the fusion is a choice at scoring time, not a learned weight, so a
        # checkpoint can be scored or warm-started under another fusion.
        alpha = torch.tensor([self.fusion.get(h, 0.0) for h in self.heads], dtype=torch.float32)
        self.register_buffer("alpha", alpha, persistent=False)
        self.chain = [
            (self.heads.index(h), self.heads.index(self.condition[h]))
            for h in conditional_order(self.condition)
        ]
        self.embeddings = FeatureEmbeddings(
            cardinalities, embedding_dim, sparse_embeddings, sequences
        )
        self.input_width = self.embeddings.num_fields * embedding_dim + num_dense

    @staticmethod
    def check(options: Mapping[str, Any]) -> None:
        heads = options.get("heads")
        if isinstance(heads, str) or not isinstance(heads, Sequence):
            raise ConfigError(f"model.heads={heads!r}: expected a list of behaviour names")
        names = [str(h) for h in heads]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"model.heads must name distinct behaviours, got {names}")
        RankingNetwork.check(options)
        require("model.head_hidden", options["head_hidden"], ints(1))
        check_fusion(options["fusion"], names)
        check_condition(options["condition"], names)

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        super().check_config(config)
        # The training keys are read by the module, but their names are checked with the
        # network's, before the data is read.
        heads = [str(h) for h in config["heads"]]
        check_head_weights(config.get("head_weights"), heads)
        check_balance(config.get("balance"), heads)

    def inputs(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None
    ) -> torch.Tensor:
        """[flattened fields, dense]: every network's input."""
        return torch.cat([self.embeddings(categorical, sequences).flatten(1), dense], dim=1)

    def shared(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What every head reads (the input, unless a subclass has a shared trunk)."""
        return self.inputs(categorical, dense, sequences)

    def head_logits(self, shared: torch.Tensor) -> torch.Tensor:
        """Logits [rows, heads] of p(head) from the shared representation."""
        return self.conditioned(self.tower_logits(shared))

    def tower_logits(self, shared: torch.Tensor) -> torch.Tensor:
        """Every head's own logit [rows, heads] (a conditional one: given its condition)."""
        raise NotImplementedError

    def forward(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.head_logits(self.shared(categorical, dense, sequences))

    def training_logits(self, shared: torch.Tensor) -> torch.Tensor:
        """What training fits, [rows, heads + conditional heads]: `head_logits`, then each
        conditional head's own logit, p(head | parent), in `chain` order. The own logit is also
        fitted directly on the rows where its parent happened (`train.heads.with_conditionals`,
        each row weighing as in the product's loss: `train.heads.loss_denominators`): through
        the product alone it learns slowly, mostly from the rows where p(parent) is high (a
        non-parent row's gradient is scaled by p(parent))."""
        own = self.tower_logits(shared)
        conditioned = self.conditioned(own)
        if not self.chain:
            return conditioned
        children = take_columns(own, [child for child, _ in self.chain])
        return torch.cat([conditioned, children.float()], 1)

    def conditioned(self, logits: torch.Tensor) -> torch.Tensor:
        """Each conditional head's logit turned into the logit of its unconditional
        probability, log p(h) = log p(h | parent) + log p(parent) in log space (exact where a
        product of probabilities would round to 0); unconditioned heads are returned as is.
        The parent's probability enters as a constant of the child's gradient."""
        if not self.chain:
            return logits
        logits = logits.float()
        log_p = list(F.logsigmoid(logits).unbind(1))
        columns = list(logits.unbind(1))
        for child, parent in self.chain:  # parents first
            # The parent's tower learns from its own loss alone: through the product, the
            # child's loss would also pull p(parent) towards the child's label (the worked
            # example's click head lost 0.007 AUC to it at d12f79d, README "Multi-task rivals").
            log_p[child] = log_p[child] + log_p[parent].detach()
            columns[child] = logit_of_log(log_p[child])
        return torch.stack(columns, dim=1)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Π_b p_b^α_b from logits [rows, heads]: the fused ranking score (log-sigmoid keeps
        it finite where a probability would round to 0)."""
        return torch.exp((F.logsigmoid(logits.float()) * self.alpha).sum(1))


def logit_of_log(log_p: torch.Tensor) -> torch.Tensor:
    """log p − log(1 − p) from log p ≤ 0, stably (Mächler's log1mexp); p is kept below 1 so
    the logit stays finite."""
    log_p = log_p.clamp(max=-torch.finfo(log_p.dtype).tiny)
    log_not = torch.where(
        log_p > -math.log(2), torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p))
    )
    return log_p - log_not


def check_condition(condition: Mapping[str, str] | None, heads: Sequence[str]) -> dict[str, str]:
    """`model.condition` -> {head: the head it is conditioned on}, every name a head, no cycle."""
    if condition is None:
        return {}
    if not isinstance(condition, Mapping):
        raise ConfigError(
            f"model.condition={condition!r}: expected a mapping head -> the head it is "
            "conditioned on, e.g. {finish: click, like: click}"
        )
    out = {str(k): str(v) for k, v in condition.items()}
    for child, parent in out.items():
        for name in (child, parent):
            if name not in heads:
                raise ConfigError(
                    f"model.condition.{child}: {name!r} is not a head of this model {list(heads)}"
                )
    for start in out:
        path = [start]
        while path[-1] in out:
            path.append(out[path[-1]])
            if path[-1] in path[:-1]:
                raise ConfigError(
                    f"model.condition.{start}: the conditions form a cycle "
                    f"({' -> '.join(path)}); a head cannot depend on itself"
                )
    return out


def conditional_order(condition: Mapping[str, str]) -> list[str]:
    """The conditional heads, every parent before its children (acyclic, `check_condition`)."""

    def depth(head: str) -> int:
        return 0 if head not in condition else 1 + depth(condition[head])

    return sorted(condition, key=depth)


class MultiHead(MultiTaskNetwork):
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
        condition: Mapping[str, str] | None = None,
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
        layers, width = mlp(self.input_width, hidden, activation, dropout)
        self.trunk = nn.Sequential(*layers)
        self.towers = towers(len(self.heads), width, head_hidden, activation, dropout)

    def shared(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.trunk(self.inputs(categorical, dense, sequences))

    def tower_logits(self, shared: torch.Tensor) -> torch.Tensor:
        return torch.cat([tower(shared) for tower in self.towers], dim=1)


def check_options(
    embedding_dim: int,
    hidden: Sequence[int],
    dropout: float,
    activation: str,
    sparse_embeddings: bool,
) -> None:
    """The options every network shares, each in its domain (`model.<key>=<value>: expected`)."""
    require("model.embedding_dim", embedding_dim, integer(1))
    require("model.hidden", hidden, ints(1))
    require("model.dropout", dropout, number(0.0, 1.0, high_open=True))
    require("model.activation", activation, one_of(*ACTIVATIONS))
    require("model.sparse_embeddings", sparse_embeddings, boolean())


def check_config(config: Mapping[str, Any]) -> None:
    """A `model` config of a network of this module (the class its `_target_` names; `DNN`
    when it names none of them), checked without building the network (so a bad value stops
    the job before the data is read). Keys left out take the defaults of that class."""
    module, _, name = str(config.get("_target_", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        cls = None
    (cls if isinstance(cls, type) and issubclass(cls, RankingNetwork) else DNN).check_config(config)


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
