"""Experiment trackers (MLflow, Weights & Biases) beside the run folder's own logs.

Lightning's `MLFlowLogger` and `WandbLogger` log the training and validation metrics as they
are logged; this module adds what a tracker should hold about a finished run, on rank 0 only:

- `connect(loggers, config)` at startup: each tracker's server is probed with a short timeout
  and its run created; one that cannot be reached is dropped with one warning line, and the job
  goes on with its local logs (mlflow's own HTTP retries would hold it for minutes). Then the
  resolved config, redacted as the run's config.yaml is, goes to each tracker as parameters.
- `finish(trainer, run_dir, metrics)` after metrics.json is written: the final val/ and test/
  values as metrics, metrics.json, config.yaml and stats.json as artifacts (best.ckpt too with
  `log_checkpoint: true`), and the tracker's run closed.
- `log_report(kind, files, name)`: `python -m train.report --tracker` logs a report as a run.

A tracker that fails in the middle of a run (the server went away) warns once and is silent
from then on: the run folder, not the tracker, is the record. mlflow and wandb are imported only
when their logger is built, never on the default `logger=csv` path.
"""

from __future__ import annotations

import os
import shutil
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlowLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

from train.errors import UpweightError
from train.layout import CONFIG_FILE, METRICS_FILE, STATS_FILE, join
from train.secrets import redact, safe_url

RUN_FILES = (METRICS_FILE, CONFIG_FILE, STATS_FILE)
"""The run folder's files each tracker keeps as artifacts."""
WANDB_OFFLINE_MODES = frozenset({"offline", "dryrun", "disabled"})


def mlflow_key(name: str) -> str:
    """A metric name as MLflow stores it: MLflow refuses `@` (`click/ndcg@10` ->
    `click/ndcg_at_10`; Lightning would drop it silently, `ndcg10`)."""
    return name.replace("@", "_at_")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def probe(url: str, timeout_s: float) -> str | None:
    """None when `url` answers HTTP within `timeout_s` (any status: the server is there), else
    why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLError):  # it answered; mlflow has its own TLS settings
            return None
        return str(reason) or type(reason).__name__


class Tracker:
    """What `connect` and `finish` ask of a tracker logger (mixed into Lightning's own)."""

    log_checkpoint: bool = False
    _failed: bool = False

    def where(self) -> str:
        """The tracker and its server, credential-free, for messages."""
        raise NotImplementedError

    def open(self) -> str | None:
        """Probe the server and start the tracker's run; None when it is ready, else what went
        wrong ("is unreachable (...)", "could not start a run (...)")."""
        raise NotImplementedError

    def log_results(
        self, metrics: Mapping[str, float], files: Sequence[str], checkpoint: str | None
    ) -> None:
        """The final metrics and the run's files, then close the tracker's run."""
        raise NotImplementedError

    def guarded(self, action: Callable[[], Any]) -> Any:
        """Run `action` unless this tracker failed before; a failure warns once, never raises."""
        if self._failed:
            return None
        try:
            return action()
        except Exception as err:  # the tracker's errors must not end a run that trains fine
            self._failed = True
            warn(
                f"{self.where()} failed ({type(err).__name__}: {str(err)[:300]}): "
                "nothing more goes to it; the run folder holds everything"
            )
            return None


class MLFlowLogger(Tracker, LightningMLFlowLogger):
    """Lightning's MLflow logger, connected from MLFLOW_TRACKING_URI when it is built (Lightning
    reads it once, when imported). MLflow reads the credentials (MLFLOW_TRACKING_USERNAME and
    _PASSWORD, or _TOKEN) from the environment itself."""

    def __init__(
        self,
        run_folder: str,
        experiment_name: str = "upweight",
        run_name: str | None = None,
        log_checkpoint: bool = False,
        probe_timeout_s: float = 5.0,
        tags: Mapping[str, Any] | None = None,
        artifact_location: str | None = None,
        synchronous: bool | None = None,
    ) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # mlflow 3 refuses a folder of files (Lightning's default) as a store
            raise UpweightError(
                "logger.mlflow: MLFLOW_TRACKING_URI is not set; expected the tracking server's "
                "URL (http://host:5000) or a local database (sqlite:///path/mlflow.db)"
            )
        self.uri = uri
        # mlflow's async queue otherwise polls an empty queue for 1 s at a time, and closing the
        # run waits out that poll (~1 s a job); buffered, the queue wakes as soon as it is told
        # to stop, and sends a second's metrics in one request.
        os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name or Path(run_folder.rstrip("/")).name,
            # Lightning's client opens its store when built (a sqlite file is created and
            # migrated): on ranks other than 0, which log nothing, one that opens nothing.
            tracking_uri=uri if rank_zero_only.rank == 0 else "http://127.0.0.1:9",
            tags={"upweight.run_folder": safe_url(run_folder), **(tags or {})},
            artifact_location=artifact_location,
            synchronous=synchronous,
        )
        self.log_checkpoint = log_checkpoint
        self.probe_timeout_s = probe_timeout_s
        self.last_step = -1

    def where(self) -> str:
        return f"MLflow at {safe_url(self.uri)}"

    def open(self) -> str | None:
        uri = self.uri
        if uri.startswith(("http://", "https://")):
            problem = probe(uri.rstrip("/") + "/health", self.probe_timeout_s)
            if problem:
                return f"is unreachable ({problem})"
        try:
            _ = self.run_id  # creates the experiment and the run: credentials are checked now
        except Exception as err:
            return f"could not start a run ({type(err).__name__}: {str(err)[:300]})"
        return None

    def log_hyperparams(self, params: Any) -> None:
        self.guarded(lambda: super(MLFlowLogger, self).log_hyperparams(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None:
            self.last_step = max(self.last_step, int(step))
        named = {mlflow_key(k): v for k, v in metrics.items()}
        self.guarded(lambda: super(MLFlowLogger, self).log_metrics(named, step))

    def finalize(self, status: str = "success") -> None:
        # Lightning calls it after each stage (fit, validate, test): `finish` closes the run
        # once at the end of the job; a failed stage is marked here.
        if status != "success":
            self.guarded(lambda: super(MLFlowLogger, self).finalize(status))

    def log_results(
        self, metrics: Mapping[str, float], files: Sequence[str], checkpoint: str | None
    ) -> None:
        # One step past every logged row: MLflow shows each metric's value at its highest step,
        # and the evaluation of best.ckpt logs at that checkpoint's (earlier) step.
        if metrics:
            self.log_metrics(dict(metrics), self.last_step + 1)

        def upload() -> None:
            client = self.experiment
            for path in files:
                client.log_artifact(self.run_id, path)
            if checkpoint:
                client.log_artifact(self.run_id, checkpoint, "checkpoints")
            client.set_terminated(self.run_id, "FINISHED")

        self.guarded(upload)


class WandbLogger(Tracker, LightningWandbLogger):
    """Lightning's W&B logger with its local files in `<run_folder>/wandb`; mode, key and
    server from the environment (WANDB_MODE, WANDB_API_KEY, WANDB_BASE_URL, ...)."""

    def __init__(
        self,
        run_folder: str,
        project: str | None = None,
        name: str | None = None,
        log_checkpoint: bool = False,
        probe_timeout_s: float = 5.0,
        **kwargs: Any,
    ) -> None:
        local = is_local(run_folder)
        super().__init__(
            name=name or Path(run_folder.rstrip("/")).name,
            project=project,
            # A run folder on object storage: W&B writes its files in the working directory.
            save_dir=run_folder.removeprefix("file://") if local else None,
            **kwargs,
        )
        self.log_checkpoint = log_checkpoint
        self.probe_timeout_s = probe_timeout_s

    def offline(self) -> bool:
        return self._offline or os.environ.get("WANDB_MODE", "").lower() in WANDB_OFFLINE_MODES

    def server(self) -> str:
        return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"

    def where(self) -> str:
        return "W&B (offline)" if self.offline() else f"W&B at {safe_url(self.server())}"

    def open(self) -> str | None:
        if not self.offline():
            problem = probe(self.server(), self.probe_timeout_s)
            if problem:
                return f"is unreachable ({problem})"
        if self._save_dir:
            os.makedirs(self._save_dir, exist_ok=True)  # else W&B falls back to a temp folder
        try:
            _ = self.experiment
        except Exception as err:
            return f"could not start a run ({type(err).__name__}: {str(err)[:300]})"
        return None

    def log_hyperparams(self, params: Any) -> None:
        self.guarded(lambda: super(WandbLogger, self).log_hyperparams(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.guarded(lambda: super(WandbLogger, self).log_metrics(metrics, step))

    def finalize(self, status: str = "success") -> None:
        self.guarded(lambda: super(WandbLogger, self).finalize(status))

    def log_results(
        self, metrics: Mapping[str, float], files: Sequence[str], checkpoint: str | None
    ) -> None:
        def upload() -> None:
            run = self.experiment
            run.summary.update(dict(metrics))
            # Copies in the W&B run's own folder, in a subfolder: W&B links files saved from
            # elsewhere (a temporary copy would be gone when an offline run is synced) and
            # writes a config.yaml of its own in that folder.
            folder = os.path.join(run.dir, "upweight")
            os.makedirs(folder, exist_ok=True)
            for path in [*files, *([checkpoint] if checkpoint else [])]:
                copy = shutil.copy(path, folder)
                run.save(copy, base_path=run.dir, policy="now")
            run.finish()

        self.guarded(upload)


def connect(loggers: Sequence[Logger], config: Mapping[str, Any]) -> list[Logger]:
    """`loggers` without the trackers that cannot be reached (one warning line each), the
    others' runs started with `config` (redacted) as parameters. Rank 0 only: on the other
    ranks Lightning's trackers do nothing, and they stay in the list as they are."""
    if rank_zero_only.rank != 0:
        return list(loggers)
    kept: list[Logger] = []
    for logger in loggers:
        if isinstance(logger, Tracker):
            problem = logger.open()
            if problem:
                warn(
                    f"{logger.where()} {problem}: the run continues with local logs only "
                    "(run folder: logs, checkpoints, metrics.json)"
                )
                continue
            logger.log_hyperparams(redact(config))
        kept.append(logger)
    return kept


def finish(trainer: L.Trainer, run_dir: str, metrics: Mapping[str, float]) -> None:
    """Give each tracker of `trainer` the final metrics and the run folder's files (best.ckpt
    where the tracker asks for it), and close its run. Nothing for csv/tensorboard, nothing on
    ranks other than 0."""
    trackers = [t for t in trainer.loggers if isinstance(t, Tracker)]
    if not trainer.is_global_zero or not trackers:
        return
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") or ""
    with tempfile.TemporaryDirectory(prefix="upweight-trackers-") as tmp:
        files = [local_copy(join(run_dir, name), tmp) for name in RUN_FILES]
        checkpoint = None
        if best and any(t.log_checkpoint for t in trackers):
            checkpoint = local_copy(best, tmp)
        for tracker in trackers:
            tracker.log_results(metrics, files, checkpoint if tracker.log_checkpoint else None)


def local_copy(url: str, folder: str) -> str:
    """A local path of `url`: itself when local, else downloaded into `folder` (MLflow and W&B
    upload local files only)."""
    if is_local(url):
        return url.removeprefix("file://")
    import fsspec

    target = os.path.join(folder, url.rstrip("/").rsplit("/", 1)[-1])
    with fsspec.open(url, "rb") as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)
    return target


TRACKERS = ("mlflow", "wandb")


def log_report(kind: str, files: Sequence[str], name: str, out: str) -> str:
    """Log a report's files as a run of their own (MLflow: in MLFLOW_EXPERIMENT_NAME or
    `upweight`; W&B: in WANDB_PROJECT or `upweight`), connected from the environment as the
    job's trackers are. Returns what was done, for the command's output."""
    tracker: Tracker
    if kind == "mlflow":
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "upweight"
        tracker = MLFlowLogger(out, experiment_name=experiment, run_name=name)
    elif kind == "wandb":
        project = os.environ.get("WANDB_PROJECT") or "upweight"
        tracker = WandbLogger(out, project=project, name=name, job_type="report")
    else:
        raise UpweightError(f"--tracker={kind}: expected one of {list(TRACKERS)}")
    problem = tracker.open()
    if problem:
        raise UpweightError(f"{tracker.where()} {problem}; the report is written in {out}")
    with tempfile.TemporaryDirectory(prefix="upweight-report-") as tmp:
        tracker.log_results({}, [local_copy(f, tmp) for f in files], None)
    if tracker._failed:
        raise UpweightError(f"{tracker.where()}: the report was not logged (see the warning)")
    if isinstance(tracker, MLFlowLogger):
        return f"logged to {tracker.where()}: run {tracker.run_id} ({name})"
    return f"logged to {tracker.where()}: run {name}"
