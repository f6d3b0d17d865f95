"""Embedding tables sharded across ranks with TorchRec (`sharding=torchrec`), an optional engine.

Only the embedding lookup and its optimizer change: the network's `embeddings` become
`TorchRecEmbeddings` (one table per column, read by name), which `TorchRecStrategy` shards over
the ranks before Lightning wraps the rest in DDP. Each rank then holds only its shards of the
tables and of their optimizer state; the tables are updated inside the backward pass by fbgemm's
fused optimizer (`sharding.optimizer`), the dense part keeps `optimizer` and `scheduler`.

Checkpoints stay the files `resume`, `best` and the Slurm requeue already handle: rank 0 writes
the ordinary checkpoint, less the sharded tables, which every rank writes with
`torch.distributed.checkpoint` into a fresh folder beside it (`<file>.shards/<id>/`) before the
file that names that folder is published. `python -m train.consolidate` turns a sharded run
into an ordinary one for predict, export, init_from and the report.

torchrec is imported only when `sharding=torchrec` is selected: the default install has none
(README, "Sharded embedding tables").
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fsspec.core import url_to_fs
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from train.data.features import FeatureSpec
from train.errors import ConfigError
from train.layout import ARTIFACT_KEY, SHARDING_PLAN_FILE, SHARDS_KEY, SHARDS_SUFFIX, join
from train.sharded_embeddings import TorchRecEmbeddings, plan_table
from train.storage import write_json

INSTALL = (
    "pip install 'upweight[torchrec-cpu]' (torchrec-cuda with a CUDA build of torch) && "
    "pip install --no-deps torchrec==1.8.0"
)
"""The pinned pair: torchrec's own metadata asks for the CUDA fbgemm-gpu and an old
torchmetrics, so it is installed without its dependencies (README)."""

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")
DEFAULTS = ("table_wise", "auto")
OPTIMIZERS = {
    "sgd": "EXACT_SGD",
    "adagrad": "EXACT_ADAGRAD",
    "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD",
    "adam": "ADAM",
}
"""`sharding.optimizer` -> fbgemm's fused optimizer (`EmbOptimType`)."""
CPU_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
"""fbgemm's CPU build asserts "not supported in CPU mode" for the others."""


class ShardingError(ConfigError):
    """A `sharding.*` value the engine cannot honour; the message names the key or table."""


class Replicated:
    """`sharding=none`: every rank holds the whole tables (the network's own embeddings, DDP)."""

    def check(self, config: Mapping[str, Any]) -> None:
        pass

    def build(self, network: Any, spec: FeatureSpec, seed: int) -> nn.Module:
        return network(spec.cardinalities, len(spec.dense), **spec.network_options)

    def strategy(self, configured: Any) -> Any:
        return configured


@dataclass(frozen=True)
class TorchRec:
    """`conf/sharding/torchrec.yaml`: how the tables are sharded and updated."""

    default: str = "table_wise"
    """Tables the plan leaves out: `table_wise` (whole tables, balanced over the ranks by
    bytes) or `auto` (TorchRec's planner decides, within `plan`)."""
    plan: Mapping[str, str] | None = None
    """Table -> table_wise, row_wise or column_wise."""
    optimizer: str = "rowwise_adagrad"
    lr: float = 0.01
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.default not in DEFAULTS:
            raise ShardingError(f"sharding.default={self.default!r}: expected one of {DEFAULTS}")
        if self.plan is None:
            object.__setattr__(self, "plan", {})
        if not isinstance(self.plan, Mapping):
            raise ShardingError(
                f"sharding.plan={self.plan!r}: expected a mapping table -> one of {SHARDING_TYPES}"
            )
        object.__setattr__(self, "plan", {str(k): v for k, v in self.plan.items()})
        for table, kind in self.plan.items():
            if kind not in SHARDING_TYPES:
                raise ShardingError(
                    f"sharding.plan.{table}={kind!r}: expected one of {SHARDING_TYPES}"
                )
        if self.optimizer not in OPTIMIZERS:
            raise ShardingError(
                f"sharding.optimizer={self.optimizer!r}: expected one of {tuple(OPTIMIZERS)}"
            )
        for key in ("lr", "eps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ShardingError(f"sharding.{key}={value!r}: expected a positive number")

    def check(self, config: Mapping[str, Any]) -> None:
        """What can be refused before any data is read (`config`: the job's resolved config):
        the engine's presence, the optimizer on this device, and training options a fused
        update cannot honour."""
        require_torchrec()
        trainer = config["trainer"]
        accelerator, init_from = trainer["accelerator"], config.get("init_from")
        nonfinite, accumulate_grad_batches = config["nonfinite"], trainer["accumulate_grad_batches"]
        if init_from:
            raise ShardingError(
                f"init_from={init_from}: a warm start into a sharded run is not supported yet "
                "(its weights are laid out for whole tables); train it with sharding=none"
            )
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        if on_cpu and self.optimizer not in CPU_OPTIMIZERS:
            raise ShardingError(
                f"sharding.optimizer={self.optimizer}: fbgemm's CPU build has no fused "
                f"{self.optimizer} (it has {CPU_OPTIMIZERS}); use one of those, or a GPU"
            )
        if on_cpu and self.default == "auto":
            rows = [t for t, kind in self.plan.items() if kind == "row_wise"]
            if rows:
                raise ShardingError(
                    f"sharding.plan.{rows[0]}=row_wise: TorchRec's planner offers no row-wise "
                    "sharding on CPU; set sharding.default=table_wise (a manual plan) to shard "
                    "rows on CPU"
                )
        # The tables are updated inside the backward pass: nothing can undo or defer it.
        if nonfinite == "skip":
            raise ShardingError(
                "nonfinite=skip: with sharding=torchrec the fused optimizer updates the tables "
                "during backward, before a bad step could be skipped; use nonfinite=stop"
            )
        if accumulate_grad_batches != 1:
            raise ShardingError(
                f"trainer.accumulate_grad_batches={accumulate_grad_batches}: the fused table "
                "optimizer steps on every backward; use 1 (a larger data.batch_size instead)"
            )

    def build(self, network: Any, spec: FeatureSpec, seed: int) -> nn.Module:
        """The network with `TorchRecEmbeddings` for its tables. It is built with one-row
        tables: the full ones would not fit one process (they exist only as shards)."""
        tables = dict(zip(spec.tables, spec.cardinalities, strict=True))
        self.check_tables(list(tables), bool(spec.sequences))
        model = network([1] * len(tables), len(spec.dense))
        old = getattr(model, "embeddings", None)
        if not isinstance(getattr(old, "table", None), nn.Embedding):
            raise ShardingError(
                f"sharding=torchrec: {type(model).__name__} has no `embeddings` table to shard"
            )
        if getattr(old, "first_order", None) is not None:
            raise ShardingError(
                f"sharding=torchrec: {type(model).__name__}'s first-order table is not sharded "
                "yet; use model=dnn, dcn, multihead, mmoe or ple"
            )
        model.embeddings = TorchRecEmbeddings(tables, old.table.embedding_dim, seed)
        return model

    def strategy(self, configured: Any) -> TorchRecStrategy:
        """Replaces the configured strategy (`auto`, `ddp`): DDP for the dense part, set up
        after the tables are sharded."""
        return TorchRecStrategy(self)

    def check_tables(self, tables: Sequence[str], has_lists: bool) -> None:
        for table in self.plan:
            if table not in tables:
                raise ShardingError(
                    f"sharding.plan.{table}: no such embedding table; the tables are {list(tables)}"
                )
        if has_lists:
            raise ShardingError(
                "data.sequences: list columns are not sharded yet; with sharding=torchrec "
                "train on single-valued categorical columns (or use sharding=none)"
            )

    def sharder(self) -> Any:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

        fused = {
            "optimizer": getattr(EmbOptimType, OPTIMIZERS[self.optimizer]),
            "learning_rate": self.lr,
            "eps": self.eps,
        }
        return EmbeddingBagCollectionSharder(fused_params=fused)

    def module_plan(
        self,
        collection: nn.Module,
        sizes: Mapping[str, tuple[int, int]],
        device: torch.device,
        local_size: int | None = None,
    ) -> Any:
        """The collection's plan: the planner's (`default: auto`, `plan` as constraints) or a
        manual one, whole tables placed largest first on the rank holding fewest bytes."""
        import torch.distributed as dist
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.distributed.sharding_plan import (
            column_wise,
            construct_module_sharding_plan,
            row_wise,
            table_wise,
        )

        world = dist.get_world_size()
        # Ranks per node: a shard's device is `cuda:<rank % local_size>` on its node.
        local_size = local_size or world
        sharder = self.sharder()
        for table, kind in self.plan.items():
            dim = sizes[table][1]
            if kind == "column_wise" and dim % world:
                raise ShardingError(
                    f"sharding.plan.{table}=column_wise: its {dim} columns do not split evenly "
                    f"over {world} ranks"
                )
        if self.default == "auto":
            # Every table sharded with the fused kernel: the planner would otherwise replicate
            # small tables (data-parallel), which only DistributedModelParallel's own DDP
            # reduces; the job's DDP leaves the tables out.
            constraints = {
                t: ParameterConstraints(
                    sharding_types=[self.plan[t]] if t in self.plan else list(SHARDING_TYPES),
                    compute_kernels=["fused"],
                )
                for t in sizes
            }
            planner = EmbeddingShardingPlanner(
                topology=Topology(
                    world_size=world, compute_device=device.type, local_world_size=local_size
                ),
                constraints=constraints,
            )
            plan = planner.collective_plan(collection, [sharder], dist.GroupMember.WORLD)
            return plan.plan[""]
        load = [0] * world
        per_table = {}
        for table, (rows, dim) in sorted(sizes.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
            kind = self.plan.get(table, "table_wise")
            if kind == "row_wise":
                per_table[table] = row_wise(compute_kernel="fused")
            elif kind == "column_wise":
                per_table[table] = column_wise(ranks=list(range(world)), compute_kernel="fused")
            else:
                rank = load.index(min(load))
                load[rank] += rows * dim
                per_table[table] = table_wise(rank=rank, compute_kernel="fused")
        return construct_module_sharding_plan(
            collection,
            per_table,
            sharder=sharder,
            local_size=local_size,
            world_size=world,
            device_type=device.type,
        )

    def shard(
        self, module: nn.Module, device: torch.device, local_size: int | None = None
    ) -> list[dict[str, Any]]:
        """Shards every `TorchRecEmbeddings` of `module` not sharded yet, in place, fills its
        shards with the plan-independent initial rows, and keeps DDP off them. Returns what
        each rank now holds (table, rank, rows, columns, bytes); empty when nothing was left
        to shard."""
        import torch.distributed as dist
        from torchrec.distributed.types import ShardingEnv

        for name in ("torchrec", "fbgemm_gpu"):  # a dozen INFO lines per table batch otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
        report: list[dict[str, Any]] = []
        ignored: list[str] = []
        for name, embeddings in module.named_modules():
            if not isinstance(embeddings, TorchRecEmbeddings) or embeddings.sharded:
                continue  # sharded by an earlier fit/validate/test of this module
            sizes = {t: (rows, embeddings.dim) for t, rows in embeddings.tables.items()}
            plan = self.module_plan(embeddings.collection, sizes, device, local_size)
            env = ShardingEnv.from_process_group(dist.GroupMember.WORLD)
            embeddings.collection = self.sharder().shard(
                embeddings.collection, plan, env, device, module_fqn=f"{name}.collection"
            )
            embeddings.sharded = True
            embeddings.initialise()
            report += embeddings.shard_report(self.optimizer)
            ignored += [f"{name}.collection.{k}" for k in embeddings.collection.state_dict()]
        if ignored:
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                module, ignored
            )
        return report


def require_torchrec() -> None:
    try:
        importlib.import_module("torchrec")
        importlib.import_module("fbgemm_gpu")
    except ImportError as err:
        raise ShardingError(
            f"sharding=torchrec needs TorchRec and fbgemm, which are not installed ({err}): "
            f"install the pinned pair with `{INSTALL}` (README, 'Sharded embedding tables')"
        ) from err


class TorchRecStrategy(DDPStrategy):
    """DDP for the dense part, TorchRec for the tables: the tables are sharded once the process
    group exists, before a checkpoint is restored and the DDP wrap (which ignores them); checkpoints
    write the shards with torch.distributed.checkpoint (see the module's docstring)."""

    def __init__(self, engine: TorchRec, **ddp: Any) -> None:
        super().__init__(**ddp)
        self.engine = engine

    def setup_environment(self) -> None:
        # Sharded as soon as the process group exists: before a checkpoint is restored into
        # the shards and before the DDP wrap, which must leave them out.
        super().setup_environment()
        report = self.engine.shard(self.lightning_module, self.root_device, self.num_processes)
        if report and self.is_global_zero:
            print(f"sharding plan ({self.engine.optimizer}):\n{plan_table(report)}", flush=True)
            root = str(self.lightning_module.trainer.default_root_dir)
            plan = {"optimizer": self.engine.optimizer, "shards": report}
            write_json(join(root, SHARDING_PLAN_FILE), plan)

    def sharded_modules(self) -> dict[str, TorchRecEmbeddings]:
        return {
            name: m
            for name, m in self.lightning_module.named_modules()
            if isinstance(m, TorchRecEmbeddings)
        }

    def sharded_prefixes(self) -> tuple[str, ...]:
        """The state-dict keys the shards hold (not the checkpoint file) start with these."""
        return tuple(f"{name}.collection." for name in self.sharded_modules())

    def shard_state(self) -> dict[str, Any]:
        """Every sharded collection's tables and fused optimizer state (ShardedTensors)."""
        return {
            name: {
                "tables": m.collection.state_dict(),
                "optimizer": m.collection.fused_optimizer.state_dict(),
            }
            for name, m in self.sharded_modules().items()
        }

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        import torch.distributed.checkpoint as dcp

        # A new folder, named alike on every rank, beside the file: `<file>.shards/<id>`.
        shards = f"{filepath}{SHARDS_SUFFIX}"
        folder = self.broadcast(uuid.uuid4().hex[:12])
        dcp.save(self.shard_state(), storage_writer=writer(join(shards, folder)))
        prefixes = self.sharded_prefixes()
        state = checkpoint.get("state_dict") or {}
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        checkpoint.setdefault(ARTIFACT_KEY, {})
        checkpoint[ARTIFACT_KEY] = dict(checkpoint[ARTIFACT_KEY]) | {
            SHARDS_KEY: {
                "folder": f"{str(filepath).rstrip('/').rsplit('/', 1)[-1]}{SHARDS_SUFFIX}/{folder}",
                "modules": list(self.sharded_modules()),
            }
        }
        # The folder first, then the file that names it: a kill in between leaves the previous
        # file and its folder whole.
        super().save_checkpoint(checkpoint, filepath, storage_options)
        self.barrier("shards saved")
        if self.is_global_zero:
            remove_other_folders(shards, keep=folder)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        entry = (checkpoint.get(ARTIFACT_KEY) or {}).get(SHARDS_KEY)
        if entry is None:
            raise ShardingError(
                f"{checkpoint_path}: an unsharded checkpoint; sharding=torchrec resumes only "
                "the checkpoints of a sharded run (warm-start from this one is not supported)"
            )
        checkpoint["_shards_at"] = shards_of(str(checkpoint_path), entry)
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        import torch.distributed.checkpoint as dcp

        state = self.shard_state()
        location = checkpoint["_shards_at"]
        try:
            dcp.load(state, storage_reader=reader(location))
        except Exception as err:  # a missing or torn folder: name it
            raise ShardingError(f"{location}: cannot read the checkpoint's shards: {err}") from err
        for name, m in self.sharded_modules().items():
            m.collection.fused_optimizer.load_state_dict(state[name]["optimizer"])
        missing, unexpected = self.lightning_module.load_state_dict(
            checkpoint["state_dict"], strict=False
        )
        missing = [k for k in missing if not k.startswith(self.sharded_prefixes())]
        if strict and (missing or unexpected):
            raise RuntimeError(f"checkpoint keys: missing {missing}, unexpected {unexpected}")

    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            fs, path = url_to_fs(f"{filepath}{SHARDS_SUFFIX}")
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path, recursive=True)


def shards_of(checkpoint: str, entry: Mapping[str, Any]) -> str:
    """Where a checkpoint's shards are: named relative to its own folder, so a copy of the file
    there (last.ckpt of best.ckpt) finds them too."""
    return join(checkpoint.rstrip("/").rsplit("/", 1)[0], entry["folder"])


def writer(url: str) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url) if "://" in url else FileSystemWriter(url)


def reader(url: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url) if "://" in url else FileSystemReader(url)


def remove_other_folders(shards: str, keep: str) -> None:
    fs, path = url_to_fs(shards)
    for entry in fs.ls(path, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] != keep:
            fs.rm(entry, recursive=True)
