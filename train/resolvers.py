"""OmegaConf resolvers the configs use; imported by every entry point before Hydra composes."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from train import gpus, host, objectives


def _if_cuda(yes: str, no: str) -> str:
    return yes if torch.cuda.is_available() else no


def register() -> None:
    # `${if_cuda:gpu,cpu}`: hardware=auto picks the GPU when there is one, never fails without.
    if not OmegaConf.has_resolver("if_cuda"):
        OmegaConf.register_new_resolver("if_cuda", _if_cuda)
    # `${precision_for:${.accelerator}}` (hardware=auto, slurm): bf16-mixed on a GPU or a CPU
    # that multiplies bf16 in hardware, else 32-true.
    if not OmegaConf.has_resolver("precision_for"):
        OmegaConf.register_new_resolver("precision_for", host.precision_for)
    # `${free_gpu:}` (hardware=free_gpu): a GPU no other upweight run on this machine holds.
    if not OmegaConf.has_resolver("free_gpu"):
        OmegaConf.register_new_resolver("free_gpu", gpus.free_gpu)
    # `${objective_directions:${objectives}}` (hydra/sweeper=pareto): maximize an AUC, minimize a
    # logloss, so that an Optuna search runs each objective its own way.
    if not OmegaConf.has_resolver("objective_directions"):
        OmegaConf.register_new_resolver("objective_directions", objectives.directions)
