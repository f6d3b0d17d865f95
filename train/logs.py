"""The run's logs, continued across a resume instead of replaced.

Every checkpoint records where each logger was (`LogPosition`): the rows of `metrics.csv`, the
last TensorBoard step. A run resumed from that checkpoint cuts each log back to that position
(what the killed run wrote after it, the resumed run writes again) and appends from there, so
the history holds every step once across any number of kills.

One row belongs to the checkpoint but is written after it: a checkpoint saved at the end of a
training step (the periodic `last.ckpt`) is saved before Lightning logs that step's row. The
checkpoint carries that row, and the resumed run writes it.
"""

from __future__ import annotations

import csv
import logging
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

POSITION_KEY = "log_position"


@runtime_checkable
class Resumable(Protocol):
    def position(self) -> dict[str, Any]:
        """Where this log is now (saved in each checkpoint)."""

    def resume_at(self, position: dict[str, Any] | None) -> None:
        """Cut the log back to `position` and append from there (None: start it afresh)."""


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger (`logs/metrics.csv`) that a resumed run appends to."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume: dict[str, Any] | None = None

    @property
    def experiment(self) -> _ExperimentWriter:  # type: ignore[override]
        if self._experiment is None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableWriter(self.log_dir, self._resume)
        return super().experiment

    def position(self) -> dict[str, Any]:
        writer = self.experiment
        if not isinstance(writer, ResumableWriter):
            return {}
        writer.save()
        return {"rows": writer.rows}

    def resume_at(self, position: dict[str, Any] | None) -> None:
        self._resume = position
        if isinstance(self._experiment, ResumableWriter):
            self._experiment.cut_to(position)


class ResumableWriter(ExperimentWriter):
    """`metrics.csv` cut back to a position (or started afresh) before its first write, instead
    of deleted when the writer starts: the writer may start before the checkpoint is read."""

    def __init__(self, log_dir: str, resume: dict[str, Any] | None) -> None:
        self.rows = 0
        self._started = False
        super().__init__(log_dir)
        if resume is not None:
            self.cut_to(resume)

    def _check_log_dir_exists(self) -> None:
        pass  # see cut_to

    def cut_to(self, position: dict[str, Any] | None) -> None:
        """Keep the first `position["rows"]` rows of the file (None: none) and append to them."""
        keep = int((position or {}).get("rows", 0))
        self.metrics, self.metrics_keys, self.rows, self._started = [], [], 0, True
        if not self._fs.isfile(self.metrics_file_path):
            if keep:
                log.warning("%s is gone: it restarts at the resumed step", self.metrics_file_path)
            return
        if not keep:
            self._fs.rm_file(self.metrics_file_path)
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [row for _, row in zip(range(keep), reader, strict=False)]
        if len(rows) < keep:
            log.warning(
                "%s holds %d rows where the checkpoint counted %d: the rest were lost",
                self.metrics_file_path,
                len(rows),
                keep,
            )
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys, self.rows = sorted(header), len(rows)

    def save(self) -> None:
        if not self._started:  # a fresh run: what an earlier run left is replaced
            pending = self.metrics
            self.cut_to(None)
            self.metrics = pending
        added = len(self.metrics)
        super().save()
        self.rows += added


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger that a resumed run appends to: its event file starts with
    TensorBoard's purge marker at the resumed step, which hides what the killed run logged from
    that step on (tensorboard's `purge_step`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_step = -1

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        if step is not None:
            self.last_step = max(self.last_step, int(step))

    def position(self) -> dict[str, Any]:
        self.save()
        return {"next_step": self.last_step + 1}

    def resume_at(self, position: dict[str, Any] | None) -> None:
        if position is None:
            return
        self.last_step = int(position["next_step"]) - 1
        self._kwargs["purge_step"] = int(position["next_step"])
        if self._experiment is not None:  # reopened with the purge marker
            self._experiment.close()
            self._experiment = None


class LogPosition(L.Callback):
    """Saves each logger's position in every checkpoint; a run resumed from one cuts its logs
    back to there and writes the row that the checkpoint carries (see the module docstring)."""

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not trainer.is_global_zero:
            return
        checkpoint[POSITION_KEY] = {
            "loggers": [
                logger.position() if isinstance(logger, Resumable) else None
                for logger in trainer.loggers
            ],
            "pending": pending_row(trainer),
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Evaluating from best.ckpt after the fit must not cut the logs back.
        if trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        saved = checkpoint.get(POSITION_KEY) or {}
        # Matched over the resumable logs only: a tracker (MLflow, W&B) added, removed or
        # dropped as unreachable between the runs leaves the CSV and TensorBoard logs whole.
        positions = [p for p in saved.get("loggers") or [] if p is not None]
        resumable = [logger for logger in trainer.loggers if isinstance(logger, Resumable)]
        if len(positions) != len(resumable):
            log.warning("the checkpoint's log positions are for other loggers: logs restart")
            positions = [None] * len(resumable)
        pending = saved.get("pending")
        for logger, position in zip(resumable, positions, strict=True):
            logger.resume_at(position)
            if pending:
                logger.log_metrics(pending["metrics"], pending["step"])
                logger.save()


def pending_row(trainer: L.Trainer) -> dict[str, Any] | None:
    """The training row Lightning logs right after the `on_train_batch_end` hooks, in which
    step-interval checkpoints are saved; None when saved elsewhere or when no row is due."""
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress.current
    inside_batch_end = trainer.training and progress.processed == progress.completed + 1
    if not inside_batch_end or trainer.fit_loop._should_accumulate():
        return None
    connector = trainer._logger_connector
    if not connector.should_update_logs:
        return None
    metrics = {
        name: float(value.item() if isinstance(value, torch.Tensor) else value)
        for name, value in connector.metrics["log"].items()
    }
    if not metrics:
        return None
    metrics.setdefault("epoch", trainer.current_epoch)
    return {"step": int(loop._batches_that_stepped), "metrics": metrics}
