"""Slurm preemption: on SIGUSR1 (Slurm's `--signal=SIGUSR1@90` before the time limit, or
`scancel -s USR1`) every rank saves `hpc_ckpt_N.ckpt` at the next optimizer-step boundary, rank 0
requeues the job, and the processes exit; the requeued job finds that checkpoint in its run
folder (keyed on SLURM_JOB_ID). Lightning's own handler saves from inside the signal handler,
wherever each rank happens to be (mid-step, mid-all-reduce), so it is turned off
(`train.checkpoint_io.plugins`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

import lightning as L
from fsspec.core import url_to_fs
from lightning.fabric.plugins.environments import SLURMEnvironment

from train.callbacks import boundary_follows
from train.checkpoint_io import HPC_NAME


class Requeued(SystemExit):
    """Ends every rank after the preemption checkpoint is saved (and the job requeued): the
    process exits like `sys.exit`, without the validation and test a finished run does."""


class SlurmRequeue(L.Callback):
    """SIGUSR1 under Slurm -> save `dirpath/hpc_ckpt_N.ckpt` at an optimizer-step boundary on
    every rank at once, `scontrol requeue` the job (rank 0), exit.

    The signal can reach ranks at different moments, so with several ranks the flag is
    all-reduced every `check_every_n_steps` steps (one tiny collective; Slurm sends the
    signal ~90 s early, far more than a few steps). Only active when Lightning detects Slurm.
    """

    def __init__(self, dirpath: str, check_every_n_steps: int = 10, signum: str = "SIGUSR1"):
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.dirpath = str(dirpath)
        self.check_every_n_steps = check_every_n_steps
        self.signum = signal.Signals[signum] if isinstance(signum, str) else signal.Signals(signum)
        self.received = False
        self._agreed = False  # every rank knows that one received the signal
        self._active = False
        self._previous: Any = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not SLURMEnvironment.detect():
            return
        self._previous = signal.signal(self.signum, self._on_signal)
        self._active = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._active:
            signal.signal(self.signum, self._previous or signal.SIG_DFL)
            self._active = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True  # acted on at the next step boundary, never inside the handler

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        # Only right after an optimizer step (never between accumulated batches).
        if not self._active or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if not self._agreed:
            if trainer.world_size == 1:
                self._agreed = self.received
            elif trainer.global_step % self.check_every_n_steps == 0:
                self._agreed = trainer.strategy.reduce_boolean_decision(self.received, all=False)
        # Before a validation or an epoch's end the save waits for the next step: Lightning
        # resumes a checkpoint written there past them, as if they had run.
        if self._agreed and not boundary_follows(trainer):
            self.save_and_requeue(trainer)

    def save_and_requeue(self, trainer: L.Trainer) -> None:
        path = trainer.strategy.broadcast(self._next_path())
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes
        message, requeued = "", False
        if trainer.is_global_zero:
            self._remove_older(trainer, path)
            requeued, message = requeue()
        requeued = trainer.strategy.broadcast(requeued)
        if trainer.is_global_zero:
            print(f"preempted at step {trainer.global_step}: saved {path}; {message}", flush=True)
        raise Requeued(0 if requeued else 3)

    def _next_path(self) -> str:
        fs, folder = url_to_fs(self.dirpath)
        numbers = [0]
        with contextlib.suppress(FileNotFoundError):
            for name in fs.ls(folder, detail=False, refresh=True):
                match = HPC_NAME.match(name.rstrip("/").rsplit("/", 1)[-1])
                if match:
                    numbers.append(int(match.group(1)))
        return f"{self.dirpath.rstrip('/')}/hpc_ckpt_{max(numbers) + 1}.ckpt"

    def _remove_older(self, trainer: L.Trainer, keep: str) -> None:
        fs, folder = url_to_fs(self.dirpath)
        kept = keep.rsplit("/", 1)[-1]
        for name in fs.ls(folder, detail=False, refresh=True):
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if HPC_NAME.match(base) and base != kept:
                with contextlib.suppress(FileNotFoundError):
                    # the strategy's removal: a sharded run's shards go with their file
                    trainer.strategy.remove_checkpoint(f"{self.dirpath.rstrip('/')}/{base}")


def slurm_job_id() -> str:
    """The id `scontrol requeue` takes: ARRAYID_TASKID for a job array task."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue() -> tuple[bool, str]:
    job = slurm_job_id()
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        done = None
        reason = str(err)
    else:
        reason = (done.stderr or done.stdout).strip()
    if done is not None and done.returncode == 0:
        return True, f"requeued job {job}; it continues from this checkpoint"
    return False, (
        f"`scontrol requeue {job}` failed ({reason}); continue with "
        "paths.output_dir=<this run folder> resume=auto"
    )
