"""Callbacks the job always runs besides Lightning's own: each rank's RNG state in the
checkpoints, and the first-epoch model that warm starts begin from."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class RandomState(L.Callback):
    """Each rank's torch RNG state (CPU, and its CUDA device) saved with the checkpoint and
    restored on resume. Model initialisation draws the same numbers in a resumed run; only
    the draws made during training (dropout) need this."""

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Runs on every rank (the checkpoint is assembled collectively), so gathering is safe.
        states = {"cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(trainer.strategy.root_device)
        if trainer.world_size > 1:
            device = trainer.strategy.root_device
            states = {k: trainer.strategy.all_gather(v.to(device)).cpu() for k, v in states.items()}
        else:
            states = {k: v.unsqueeze(0) for k, v in states.items()}
        checkpoint["rng_states"] = states

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("rng_states")
        if trainer.state.fn != "fit" or not states:
            return  # evaluation draws nothing at random
        if states["cpu"].shape[0] != trainer.world_size:
            log.warning("the checkpoint's RNG states are for another number of ranks: not restored")
            return
        rank = trainer.global_rank
        # clone(): the generator reads the state from the start of its storage, not the view's.
        torch.random.set_rng_state(states["cpu"][rank].clone())
        if "cuda" in states and trainer.strategy.root_device.type == "cuda":
            torch.cuda.set_rng_state(states["cuda"][rank].clone(), trainer.strategy.root_device)


class FirstEpochCheckpoint(ModelCheckpoint):
    """Saves `dirpath/first_epoch.ckpt` (weights only) at the first validation of the first
    epoch, and never again: the model to warm-start other schemes from. One trained for
    several passes over the same rows has memorised their ids and starts a new scheme worse
    than a random init (README, "Warm-started re-weighting").

    Gated on the epoch, not only on the callback's own state: a run resumed from a checkpoint
    written at that same validation (before this callback had saved) must not save again.
    """

    def __init__(self, dirpath: str, filename: str = "first_epoch") -> None:
        super().__init__(
            dirpath=dirpath, filename=filename, save_weights_only=True, enable_version_counter=False
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):  # runs without validation save here
            super().on_train_epoch_end(trainer, pl_module)

    def _due(self, trainer: L.Trainer) -> bool:
        return trainer.current_epoch == 0 and not self.best_model_path
