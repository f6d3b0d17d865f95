"""The host and the device: where reading a value back costs nothing, and columns picked
without host data.

A GPU runs ahead of Python until something reads a value back (`.item()`, `bool(tensor)`, an op
whose output size depends on the data); then it waits once per step. The CPU runs every op
before the next line of Python, so there a read stalls nothing, and the training step may
take the cheaper path a read allows: the lazy Adam update makes its rows distinct, skips a
non-finite step without arithmetic, and the non-finite guard records a batch's facts only when
the batch is bad. tests/test_no_sync.py empties `READS_FREE_ON` to check the device paths on the
CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

READS_FREE_ON = frozenset({"cpu"})
"""Device types whose ops have finished when Python reads their result."""


def reads_free(device: torch.device) -> bool:
    return device.type in READS_FREE_ON


def take_columns(tensor: torch.Tensor, picked: Sequence[int]) -> torch.Tensor:
    """`tensor[..., picked]` without an index tensor. A list index becomes a tensor made from
    Python data, which a GPU copies from pageable host memory, blocking until the device has
    caught up (tests/nosync.py flags it); one view per column and a stack read nothing."""
    return torch.stack([tensor[..., i] for i in picked], dim=-1)
