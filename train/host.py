"""The host and the device: where reading a value back costs nothing, and columns picked
without host data.

A GPU runs ahead of Python until something reads a value back (`.item()`, `bool(tensor)`, an op
whose output size depends on the data); then it waits once per step. The CPU runs every op
before the next line of Python, so there a read stalls nothing, and the training step may
take the cheaper path a read allows: the lazy Adam update makes its rows distinct, skips a
non-finite step without arithmetic, and the non-finite guard records a batch's facts only when
the batch is bad. tests/test_no_sync.py empties `READS_FREE_ON` to check the device paths on the
CPU. And the precision a run takes by default on its hardware (`precision_for`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

READS_FREE_ON = frozenset({"cpu"})
"""Device types whose ops have finished when Python reads their result."""


def reads_free(device: torch.device) -> bool:
    return device.type in READS_FREE_ON


NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU flags (`torch.cpu.get_capabilities()`'s names) of CPUs that multiply bfloat16 in hardware:
x86's AVX512-BF16 and AMX, Arm's BF16 extension. Elsewhere oneDNN emulates bf16, slower than
float32."""


def cpu_capabilities() -> Mapping[str, object]:
    """This CPU's flags: `torch.cpu.get_capabilities()`, or on a torch without it the x86 bf16
    checks that torch had before."""
    if hasattr(torch.cpu, "get_capabilities"):
        return torch.cpu.get_capabilities()
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return {flag: getattr(torch.cpu, check, lambda: False)() for flag, check in checks.items()}


def precision_for(accelerator: str) -> str:
    """The Trainer precision `hardware=auto` and `slurm` take on `accelerator` (a Trainer's:
    "gpu"/"cuda" or "cpu"): bf16 mixed precision (the matmuls in bf16; the weights, optimizer
    and loss in float32) on any CUDA GPU, as before, and on a CPU with a flag above; else
    float32. A GPU's capability is not read: that would initialise CUDA in this process before
    Lightning forks or spawns its ranks (a pre-Ampere GPU emulates bf16: set
    `trainer.precision=32-true` there). On a 2-core AVX512-BF16 CPU the DNN's forward and
    backward take half the time, with the same test AUCs (README, "Precision")."""
    if accelerator in ("gpu", "cuda"):
        bf16 = torch.cuda.is_available()
    else:
        capabilities = cpu_capabilities() if accelerator == "cpu" else {}
        bf16 = any(capabilities.get(flag, False) for flag in NATIVE_BF16_CPU_FLAGS)
    return "bf16-mixed" if bf16 else "32-true"


def take_columns(tensor: torch.Tensor, picked: Sequence[int]) -> torch.Tensor:
    """`tensor[..., picked]` without an index tensor. A list index becomes a tensor made from
    Python data, which a GPU copies from pageable host memory, blocking until the device has
    caught up (tests/nosync.py flags it); one view per column and a stack read nothing."""
    return torch.stack([tensor[..., i] for i in picked], dim=-1)
