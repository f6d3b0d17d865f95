"""A test-only callback that kills the job's own processes at a point chosen by step, so that
kill tests land exactly where they mean to (no sleeps, no races with the run's speed):

    python -m train ... +callbacks.kill._target_=tests.killer.KillAt \
        +callbacks.kill.step=25 +callbacks.kill.where=train_batch_end

`where`:
- `train_batch_start`: before the batch after optimizer step `step` (after everything that step
  wrote: its log row, the checkpoints of its epoch's end);
- `train_batch_end`: right after optimizer step `step`, before the checkpoints of that step;
- `validation_end`: after the validation at `step`, before the checkpoints of that epoch's end;
- `checkpoint_write`: in the middle of writing the first checkpoint at `step` (half its bytes
  are in the temporary file);
- `test`: during the final test (`step` is ignored).

`rank`: only this rank acts (None: every rank, at the same point). `group`: the signal goes to
the whole process group, every rank and worker at once, as when a node is lost (start the job
in a session of its own). `signal`: `SIGKILL`, or e.g. `SIGUSR1` for Slurm's preemption notice
(sent once).
"""

from __future__ import annotations

import io
import os
import signal as signals
import sys
from typing import Any

import lightning as L
import torch

POINTS = ("train_batch_start", "train_batch_end", "validation_end", "checkpoint_write", "test")


class KillAt(L.Callback):
    def __init__(
        self,
        step: int = 0,
        where: str = "train_batch_end",
        rank: int | None = None,
        signal: str = "SIGKILL",
        group: bool = False,
    ) -> None:
        if where not in POINTS:
            raise ValueError(f"where={where!r}: expected one of {POINTS}")
        self.step, self.where, self.rank = step, where, rank
        self.signum = signals.Signals[signal]
        self.group = group
        self.sent = False

    def _fire(self, trainer: L.Trainer, where: str, step_matters: bool = True) -> None:
        if self.sent or where != self.where:
            return
        if step_matters and trainer.global_step != self.step:
            return
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        self.sent = True
        print(
            f"killer: {self.signum.name} at {where}, step {trainer.global_step}, "
            f"rank {trainer.global_rank}",
            file=sys.stderr,
            flush=True,
        )
        if self.group:
            os.killpg(os.getpgid(0), self.signum)
        else:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._fire(trainer, "train_batch_start")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._fire(trainer, "train_batch_end")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._fire(trainer, "validation_end")

    def on_test_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._fire(trainer, "test", step_matters=False)

    def on_save_checkpoint(self, trainer: L.Trainer, *args: Any) -> None:
        if self.where != "checkpoint_write" or self.sent or trainer.global_step != self.step:
            return
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if not trainer.is_global_zero:  # only rank 0 writes: the others die with it
            self._fire(trainer, "checkpoint_write")
            return
        save = torch.save
        killer = self

        def half_then_die(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            killer._fire(trainer, "checkpoint_write")

        torch.save = half_then_die  # the process dies inside this save: nothing else sees it
