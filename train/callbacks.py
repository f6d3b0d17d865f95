"""Callbacks the job always runs besides Lightning's own: the training state Lightning leaves
out of checkpoints, the first-epoch model that warm starts begin from, and the reduction of
sparse gradients under DDP that NCCL can run."""

from __future__ import annotations

import logging
import shutil
from typing import Any

import lightning as L
import torch
from fsspec.core import url_to_fs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn.parallel import DistributedDataParallel

from train.layout import FIRST_EPOCH_CHECKPOINT
from train.sparse_allreduce import has_sparse_gradients, reduce_gradients
from train.storage import atomic_write

log = logging.getLogger(__name__)


class TrainingState(L.Callback):
    """What a checkpoint needs besides Lightning's own state to resume exactly:

    - each rank's torch RNG state (CPU, and its CUDA device): model initialisation draws the
      same numbers in a resumed run; only the draws made during training (dropout) need this;
    - a stop already decided (`trainer.should_stop`, e.g. by early stopping at the validation
      that the epoch-end checkpoint follows): Lightning does not save it, and a run resumed from
      that checkpoint would otherwise train an epoch that the uninterrupted run never trained.
    """

    def __init__(self) -> None:
        self._stop = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop:
            trainer.should_stop = True
            self._stop = False

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
        checkpoint["should_stop"] = bool(trainer.should_stop)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != "fit":
            return  # evaluation draws nothing at random and has nothing to stop
        self._stop = bool(checkpoint.get("should_stop", False))
        states = checkpoint.get("rng_states")
        if not states:
            return
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
    epoch, and never again: one of the models `init_from=RUN_FOLDER` probes for warm-starting
    another scheme (on some data it transfers better than the converged one: README,
    "Warm-started re-weighting").

    Gated on the epoch, not only on the callback's own state: a run resumed from a checkpoint
    written at that same validation (before this callback had saved) must not save again.
    """

    def __init__(
        self, dirpath: str, filename: str = FIRST_EPOCH_CHECKPOINT.removesuffix(".ckpt")
    ) -> None:
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


class LastCheckpoint(ModelCheckpoint):
    """`dirpath/last.ckpt`, its only writer: every `every_n_train_steps` optimizer steps (0: never
    mid-epoch) and at every epoch's end, after that epoch's validation, early stopping and
    best.ckpt (Lightning's ModelCheckpoint takes steps or epochs, not both).

    A step that a validation or the epoch's end follows is saved after them instead: Lightning
    resumes a checkpoint written at such a step past them, as if they had run.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 500) -> None:
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )
        self._deferred = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        due = self._every_n_train_steps > 0 and trainer.global_step % self._every_n_train_steps == 0
        if not due or self._should_skip_saving_checkpoint(trainer):
            return
        if boundary_follows(trainer):
            self._deferred = True
        else:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        at_epoch_end = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self._deferred and not at_epoch_end and self._saving(trainer):
            self._deferred = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._saving(trainer):
            self._deferred = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _saving(self, trainer: L.Trainer) -> bool:
        return (
            trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed from a checkpoint with nothing left to train (best.ckpt, written just before
        # last.ckpt at the final epoch's end, by a run killed in between): that file is the
        # run's final state, and last.ckpt becomes a copy of it.
        source = str(trainer.ckpt_path or "")
        if (
            trainer.is_global_zero
            and source
            and source.rstrip("/").rsplit("/", 1)[-1] != f"{self.CHECKPOINT_NAME_LAST}.ckpt"
            and self._last_global_step_saved != trainer.global_step
        ):
            fs, path = url_to_fs(source)
            with fs.open(path, "rb") as handle:
                atomic_write(
                    self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST),
                    lambda out: shutil.copyfileobj(handle, out, 1 << 24),
                )


def boundary_follows(trainer: L.Trainer) -> bool:
    """Whether a validation or the epoch's end comes right after the current training batch.
    Lightning resumes a checkpoint saved at such a batch past them (as if they had run), so
    checkpoints that resume=auto may pick are saved after them instead."""
    loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    return bool(loop.batch_progress.is_last_batch) or (
        fetcher is not None and loop._should_check_val_fx(fetcher)
    )


class SparseAllReduce(L.Callback):
    """Registers `train.sparse_allreduce.reduce_gradients` on the DDP model of a run with several
    processes whose network has sparse gradients (`model.sparse_embeddings: true`, the default):
    they are then reduced with dense all-gathers, which NCCL has, not with DDP's sparse all-reduce,
    which only gloo has. A network without sparse gradients keeps DDP's own (C++) all-reduce."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The strategy wraps the model in DDP in its setup, after the callbacks' `setup` and
        # before this hook; DDP takes a hook until the first backward.
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel) or not has_sparse_gradients(model):
            return
        try:
            model.register_comm_hook(model.process_group, reduce_gradients)
        except RuntimeError as err:  # DDP takes one hook: the strategy was given its own
            raise RuntimeError(
                "the strategy registered a DDP communication hook already; sparse embedding "
                "gradients need train.sparse_allreduce.reduce_gradients on NCCL: drop the "
                "strategy's hook, or set callbacks.sparse_allreduce=null and use gloo"
            ) from err
