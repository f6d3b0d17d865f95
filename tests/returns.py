"""A test-only Hydra callback that writes what each job of a sweep returned to its sweeper into
the job's run folder (`returned.json`), so a test compares what Optuna was told with what the run
wrote (Optuna 2.10's own trial store, SQLite, does not open with this SQLAlchemy):

    python -m train -m ... +hydra.callbacks.returns._target_=tests.returns.RecordReturns
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RETURNED = "returned.json"


class RecordReturns(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        value = job_return.return_value
        folder = Path(config.paths.output_dir)
        if folder.is_dir():  # a job that failed early left no run folder
            (folder / RETURNED).write_text(json.dumps(value))
