"""The embedding tables of a sharded run (`sharding=torchrec`, see `train.sharding`): the module
that takes `FeatureEmbeddings`' place in a network, its plan-independent initial rows, and what
each rank holds. torchrec is imported only when one is built."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from train.model import Embeddings

OPTIMIZER_STATE = {"sgd": (0, 0), "adagrad": (1, 0), "rowwise_adagrad": (0, 1), "adam": (2, 0)}
"""The fused optimizer's state floats: (per table value, per row of each shard)."""

INIT_STD = 0.01  # as FeatureEmbeddings: small rows, so rarely seen ids add little noise
INIT_CHUNK = 1 << 16
"""Rows drawn from one seeded generator: a table's values depend on the seed and the row, never
on the plan, so every sharding starts from the same tables."""


class TorchRecEmbeddings(Embeddings):
    """`FeatureEmbeddings`' place in a network when the tables are sharded: one TorchRec table
    per categorical column (named after it), fed a KeyedJaggedTensor of the batch's ids (one id
    per row and column). Pooled outputs are read by name: a sharded collection returns them
    grouped by shard, not in column order."""

    def __init__(self, tables: Mapping[str, int], dim: int, seed: int) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

        self.tables = dict(tables)  # in the data's column order: the fields' order
        self.dim = dim
        self.seed = seed
        self.sharded = False
        # On the meta device: the sharder allocates each rank's shards only.
        self.collection = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=t,
                    embedding_dim=dim,
                    num_embeddings=rows,
                    feature_names=[t],
                    pooling=PoolingType.SUM,
                )
                for t, rows in self.tables.items()
            ],
            device=torch.device("meta"),
        )

    @property
    def num_fields(self) -> int:
        return len(self.tables)

    def _apply(self, fn: Any, recurse: bool = True) -> TorchRecEmbeddings:
        # Unsharded, the tables are meta tensors, which cannot move: a run that stops before
        # sharding (its error) still tears down (`.cpu()`), and the sharder places the shards.
        if not self.sharded:
            return self
        return super()._apply(fn, recurse)

    def lookup(
        self, categorical: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        from torchrec import KeyedJaggedTensor

        # Key-major values: every row's id of the first column, then the second's, ...
        ids = KeyedJaggedTensor(
            keys=list(self.tables),
            values=categorical.t().reshape(-1),
            lengths=torch.ones(categorical.numel(), dtype=torch.int32, device=categorical.device),
        )
        pooled = self.collection(ids).to_dict()
        return torch.stack([pooled[t] for t in self.tables], dim=1), None

    def local_shards(self) -> dict[str, list[tuple[list[int], torch.Tensor]]]:
        """Table -> this rank's shards as (offsets [row, column], values)."""
        out: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
        for key, value in self.collection.state_dict().items():
            table = key.split(".")[-2]  # embedding_bags.<table>.weight
            out[table] = [(list(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
        return out

    @torch.no_grad()
    def initialise(self) -> None:
        numbers = {table: j for j, table in enumerate(self.tables)}  # alike on every rank
        for table, shards in self.local_shards().items():
            for (row, column), values in shards:
                rows, columns = values.shape
                # One generator's chunk at a time: a whole shard's draw would double its memory
                # at the start, and a piece across two chunks would draw both.
                start = row
                while start < row + rows:
                    stop = min(row + rows, (start // INIT_CHUNK + 1) * INIT_CHUNK)
                    block = initial_rows(self.seed, numbers[table], start, stop - start, self.dim)
                    values[start - row : stop - row].copy_(block[:, column : column + columns])
                    start = stop

    def shard_report(self, optimizer: str) -> list[dict[str, Any]]:
        """This rank's shards, gathered from every rank: what each rank really holds."""
        import torch.distributed as dist

        mine = [
            {
                "table": table,
                "rank": dist.get_rank(),
                "row": row,
                "column": column,
                "rows": values.shape[0],
                "columns": values.shape[1],
            }
            for table, shards in self.local_shards().items()
            for (row, column), values in shards
        ]
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        rows = [r for part in everyone for r in part]
        per_value, per_row = OPTIMIZER_STATE[optimizer]
        for r in rows:
            values = r["rows"] * r["columns"]
            r["bytes"] = 4 * (values * (1 + per_value) + r["rows"] * per_row)
        return rows


def initial_rows(seed: int, table: int, start: int, count: int, dim: int) -> torch.Tensor:
    """Rows [start, start + count) of table number `table`: N(0, INIT_STD²) values drawn in
    fixed chunks of INIT_CHUNK rows, each from its own seeded generator."""
    first, last = start // INIT_CHUNK, (start + count - 1) // INIT_CHUNK
    parts = []
    for chunk in range(first, last + 1):
        generator = torch.Generator().manual_seed(
            ((seed * 1_000_003 + table) * 1_000_003 + chunk) % (1 << 62)
        )
        parts.append(torch.randn(INIT_CHUNK, dim, generator=generator) * INIT_STD)
    block = torch.cat(parts)
    offset = start - first * INIT_CHUNK
    return block[offset : offset + count]


def plan_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The plan as a table a person reads: table, sharding, each rank's rows × columns and MiB."""
    per_rank: dict[int, int] = {}
    lines = [
        "table | rank | rows | columns | MiB (with optimizer state)",
        "--- | --- | --- | --- | ---",
    ]
    for r in sorted(rows, key=lambda r: (r["table"], r["rank"], r["row"], r["column"])):
        per_rank[r["rank"]] = per_rank.get(r["rank"], 0) + r["bytes"]
        lines.append(
            f"{r['table']} | {r['rank']} | {r['row']}..{r['row'] + r['rows']} | "
            f"{r['column']}..{r['column'] + r['columns']} | {r['bytes'] / 2**20:.2f}"
        )
    lines.append(
        "per rank: "
        + ", ".join(f"rank {k}: {v / 2**20:.2f} MiB" for k, v in sorted(per_rank.items()))
    )
    return "\n".join(lines)
