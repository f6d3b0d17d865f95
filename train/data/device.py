"""Where a run's loaded tables live (`data.device`): on the GPU of a CUDA run when they fit, so
every batch is sliced there and nothing crosses the bus per step; otherwise on the host, where
the loaders cut each batch into pinned memory so that its copy to the GPU is asynchronous.

- `auto` (default): resident when the run is on CUDA, in memory mode, and the tables take at most
  `RESIDENT_SHARE` of the device's free memory (split by split, train first); else the host.
- `cuda`: every loaded split resident; a run that cannot (no CUDA device, a CPU accelerator,
  stream mode, tables larger than the free memory) is an error naming `data.device`.
- `cpu`: never resident (batches still pinned on a CUDA run).

Residency changes where rows are cut, not which rows: the permutation is drawn on the host from
(seed, epoch) either way, so a resident run sees the batches of a host run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from train.data.batch import Batch
from train.data.features import DataConfigError, DataError

DEVICES = ("auto", "cpu", "cuda")
RESIDENT_SHARE = 0.5
"""`auto` keeps tables on the GPU while they take at most this share of its free memory at the
data module's `setup`. Lightning moves the model to the GPU after that hook, so the other half is
for the embedding tables, their optimizer state and a batch's activations."""
SPLIT_ORDER = ("train", "val", "test")
"""The training split first: it is sliced every step, the others once per evaluation."""
GIB = 1 << 30

log = logging.getLogger(__name__)


def require_cuda(requested: str, mode: str, root: torch.device | None = None) -> None:
    """Refuse `data.device=cuda` where the tables cannot be resident: data streamed from storage
    (never loaded), or no CUDA device (`root`: the run's device; None before the trainer exists,
    when only the machine can be asked)."""
    if requested != "cuda":
        return
    if mode == "stream":
        raise DataConfigError(
            "data.device=cuda keeps the loaded tables on the GPU, but data.mode is stream (rows "
            "are read on the fly, never loaded): expected data.mode=memory (or a larger "
            "data.memory_limit_gb when auto chose stream) or data.device=auto"
        )
    if root is None and not torch.cuda.is_available():
        where = "this machine has no CUDA device (torch.cuda.is_available() is False)"
    elif root is not None and root.type != "cuda":
        where = f"this run trains on {root}, not on a CUDA device"
    else:
        return
    raise DataConfigError(
        f"data.device=cuda: {where}: expected a CUDA run (e.g. hardware=gpu) or data.device=auto "
        "(resident only on a CUDA run) or data.device=cpu"
    )


def resident_splits(
    tables: Mapping[str, Batch], requested: str, root: torch.device, free: int | None
) -> tuple[list[str], str]:
    """The splits of `tables` to move to `root` and the line that says where each one is.
    `free`: bytes free on `root` (CUDA runs; ignored otherwise)."""
    sizes = {s: tables[s].nbytes() for s in SPLIT_ORDER if s in tables}
    sizes |= {s: t.nbytes() for s, t in tables.items() if s not in sizes}
    cuda = root.type == "cuda"
    chosen: list[str] = []
    reason = ""
    if cuda and requested == "cuda":
        total = sum(sizes.values())
        if free is not None and total > free:
            raise DataError(
                f"data.device=cuda: the loaded tables take {total / GIB:.2f} GiB and {root} has "
                f"{free / GIB:.2f} GiB free: expected data.device=auto (resident only when they "
                "fit) or data.device=cpu"
            )
        chosen = list(sizes)
    elif cuda and requested == "auto":
        budget = RESIDENT_SHARE * (free or 0)
        used = 0
        for split, size in sizes.items():
            if used + size <= budget:
                chosen.append(split)
                used += size
        reason = f"; at most {RESIDENT_SHARE:.0%} of {(free or 0) / GIB:.2f} GiB free on {root}"
    host = [s for s in sizes if s not in chosen]
    parts = []
    if chosen:
        parts.append(f"{_names(chosen, sizes)} resident on {root}")
    if host:
        copied = f", batches copied to {root} from pinned memory" if cuda else ""
        parts.append(f"{_names(host, sizes)} on the CPU{copied}")
    return chosen, f"data.device={requested}: {'; '.join(parts) or 'no tables'}{reason}"


class TablePlacement:
    """The data module's side of `data.device`: the tables placed for the trainer's device at
    `setup` (under DDP each rank's own GPU), and whether batches cut on the host are pinned."""

    device: str
    """`data.device` as given (checked by `check_settings`)."""
    target: torch.device | None
    """The run's device, from the trainer at `setup`; None: batches stay where they are cut."""
    mode: str
    tables: dict[str, Batch]
    trainer: Any

    def check_device(self, root: torch.device) -> None:
        """`data.device=cuda` against the run's device and the mode `prepare()` chose: the job
        calls it as soon as its trainer exists, before anything is written."""
        require_cuda(self.device, self.mode, root)

    def setup(self, stage: str) -> None:
        # Each stage (fit, validate, test) calls this; the tables move at the first only, unless
        # a trainer on another device comes along.
        if self.trainer is not None and self.trainer.strategy.root_device != self.target:
            self.place(self.trainer.strategy.root_device, report=self.trainer.is_global_zero)

    def place(self, root: torch.device, report: bool = True) -> None:
        """Move each table where `data.device` puts it for a run on `root`, and log where each
        split is (`report`: rank 0's job)."""
        self.check_device(root)
        self.target = root
        cuda = root.type == "cuda"
        if self.mode != "memory":
            copied = f", batches copied to {root} from pinned memory" if cuda else ""
            line = f"data.device={self.device}: data.mode=stream reads on the CPU{copied}"
        else:
            host = torch.device("cpu")
            if any(t.categorical.device not in (root, host) for t in self.tables.values()):
                # Left on another GPU by an earlier trainer: back to the host, measured afresh.
                self.tables = {s: t.to(host) for s, t in self.tables.items()}
            free = torch.cuda.mem_get_info(root)[0] if cuda and self.device != "cpu" else None
            resident, line = resident_splits(self.tables, self.device, root, free)
            for split, table in self.tables.items():
                # Blocking: one copy from pageable memory, with nothing to overlap yet.
                self.tables[split] = table.to(root if split in resident else host, False)
        if report:
            log.info(line)

    def pin(self, table: Batch | None = None) -> bool:
        """Pin the batches cut on the host (from `table`, or streamed) for a CUDA run; never
        otherwise (pinning needs CUDA, and a CPU run gains nothing from it)."""
        on_host = table is None or table.categorical.device.type == "cpu"
        return self.target is not None and self.target.type == "cuda" and on_host


def _names(splits: list[str], sizes: Mapping[str, int]) -> str:
    return f"{', '.join(splits)} ({sum(sizes[s] for s in splits) / GIB:.2f} GiB)"
