"""Checkpoints that survive the ways jobs really end, and the checkpoint a run continues from.

- `AtomicCheckpointIO` publishes a checkpoint whole or not at all, on a local disk and on any
  fsspec URL: a process killed while it writes never leaves a torn file in place of the
  previous good one.
- `select_checkpoint`: `ckpt_path=URL` resumes from that file; `resume=auto` from the newest
  checkpoint in the run folder that loads (`hpc_ckpt_*`, `last`, `best`, ...).
- `SlurmRequeue`: on SIGUSR1 (Slurm's `--signal=SIGUSR1@90` before the time limit, or
  `scancel -s USR1`) every rank saves `hpc_ckpt_N.ckpt` at the next optimizer-step boundary,
  rank 0 requeues the job, and the processes exit; the requeued job finds that checkpoint in
  its run folder (keyed on SLURM_JOB_ID). Lightning's own handler saves from inside the signal
  handler, wherever each rank happens to be (mid-step, mid-all-reduce), so it is turned off.
- `RandomState`: every rank's torch RNG state travels in the checkpoint, so random layers
  (dropout) draw the stream an uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import lightning as L
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)
# The periodic `last` ModelCheckpoint is a second one; `ckpt_path="best"` rightly takes the
# first's (the `checkpoint` callback's) best, which Lightning warns about on every run.
warnings.filterwarnings("ignore", message=r".*configured with multiple `ModelCheckpoint`")

# Stores that publish an object only when its upload completes (single PUT or a completed
# multipart upload): a writer that dies mid-upload leaves the previous object untouched.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci"}
TRAINING_KEYS = ("state_dict", "loops", "optimizer_states")
HPC_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class ResumeError(ValueError):
    """`resume`/`ckpt_path` cannot be honoured; the message names the folder or file."""


# --------------------------------------------------------------------------- atomic writes


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save/torch.load checkpoint IO, with writes that cannot tear
    (see `atomic_save`). Reading and removing are Lightning's (fsspec, any URL)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options (fsspec reads them)")
        atomic_save(checkpoint, str(path))


def atomic_save(obj: Any, url: str) -> None:
    """`torch.save(obj)` to `url` so that readers see the old file or the new one, never a part.

    Local disk: a hidden temporary file in the same folder, fsync, `os.replace` (atomic on
    POSIX), fsync of the folder. Object stores: the bytes are serialised in memory first and
    uploaded in one request (the store publishes the object when the upload completes; a
    partial multipart upload is never visible). Other filesystems: a temporary name, then a
    rename (atomic where the filesystem's rename is).
    """
    fs, path = url_to_fs(url)
    parent = fs._parent(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        _save_local(obj, path)
        return
    if OBJECT_STORES & set(_protocols(fs)):
        # In memory first: a pickling error must not close (= publish) a half-written upload.
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        fs.pipe_file(path, buffer.getvalue())
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with fs.open(temporary, "wb") as handle:
            torch.save(obj, handle)
        fs.mv(temporary, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(temporary)
        raise


def _save_local(obj: Any, path: str) -> None:
    folder, name = os.path.split(os.path.abspath(path))
    # A leading dot and a .tmp suffix: never mistaken for a checkpoint by `resume=auto`.
    prefix = f".{name}."
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; match a plain open()
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(folder)
    # Leftovers of writers killed mid-save (their rename never happened).
    for stale in os.listdir(folder):
        if stale.startswith(prefix) and stale.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, stale))


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def plugins() -> list[Any]:
    """Trainer plugins: atomic checkpoint writes, and under Slurm the Slurm environment with
    Lightning's in-signal-handler requeue turned off (`SlurmRequeue` does it at a step
    boundary instead)."""
    found: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        found.append(SLURMEnvironment(auto_requeue=False))
    return found


# --------------------------------------------------------------------------- choosing a checkpoint


@dataclass(frozen=True)
class Candidate:
    url: str
    modified: float
    priority: tuple[int, int]
    """On equal times: hpc_ckpt_N (newest N first), then last, then any other."""


def select_checkpoint(
    resume: str | bool | None, ckpt_path: str | None, folders: Iterable[str]
) -> str | None:
    """The checkpoint `trainer.fit` continues from, or None to start fresh.

    `ckpt_path` (a path or fsspec URL) wins. `resume=auto` takes the newest checkpoint in
    `folders` that loads and holds training state; none there: a fresh start; some there but
    none loadable: an error (starting over would overwrite them). `resume=false`: fresh.
    """
    if ckpt_path:
        problem = unusable(str(ckpt_path))
        if problem is not None:
            raise ResumeError(f"ckpt_path={ckpt_path}: {problem}")
        return str(ckpt_path)
    if resume is None or resume is False or str(resume).lower() in ("false", "no", "never"):
        return None
    if str(resume).lower() != "auto":
        raise ResumeError(
            f"resume={resume!r}: expected `auto` (continue from the newest loadable checkpoint "
            "in the run folder) or `false`; to continue from a given file use ckpt_path=PATH_OR_URL"
        )
    folders = list(dict.fromkeys(str(f) for f in folders if f))
    candidates = find_checkpoints(folders)
    refused = []
    for candidate in candidates:
        problem = unusable(candidate.url)
        if problem is None:
            log.info("resume=auto: continuing from %s", candidate.url)
            return candidate.url
        log.warning("resume=auto: skipping %s: %s", candidate.url, problem)
        refused.append(f"{candidate.url}: {problem}")
    if refused:
        raise ResumeError(
            "resume=auto: no checkpoint in the run folder loads:\n  "
            + "\n  ".join(refused)
            + "\nstart over with resume=false (it overwrites them), or pass ckpt_path=PATH_OR_URL"
        )
    log.info("resume=auto: no checkpoint in %s; starting fresh", folders)
    return None


def folders(trainer: L.Trainer) -> list[str]:
    """Where a run's checkpoints are: the run folder and every callback's `dirpath`."""
    found = [str(trainer.default_root_dir)]
    found += [str(c.dirpath) for c in trainer.callbacks if getattr(c, "dirpath", None)]
    return list(dict.fromkeys(found))


def find_checkpoints(folders: Sequence[str]) -> list[Candidate]:
    """Every `*.ckpt` file directly in `folders`, newest first."""
    found: dict[str, Candidate] = {}
    for folder in folders:
        fs, path = url_to_fs(folder)
        try:
            entries = fs.ls(path, detail=True, refresh=True)
        except TypeError:  # filesystems without a listings cache take no `refresh`
            entries = fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") != "file" or not name.endswith(".ckpt") or name.startswith("."):
                continue
            url = (
                entry["name"]
                if isinstance(fs, LocalFileSystem)
                else fs.unstrip_protocol(entry["name"])
            )
            found[url] = Candidate(url, _modified(entry), _priority(name))
    return sorted(found.values(), key=lambda c: (c.modified, c.priority), reverse=True)


def unusable(url: str) -> str | None:
    """Why the checkpoint at `url` cannot be resumed from (None: it can): it must load with
    `weights_only=True` (as Lightning loads it) and hold model, optimizer and loop state."""
    try:
        fs, path = url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            # mmap: every record is checked without reading the tensors into memory.
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            with fs.open(path, "rb") as handle:
                checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports a torn archive in many ways
        text = str(err).strip().splitlines()
        return f"does not load ({type(err).__name__}: {text[0] if text else ''})"
    if not isinstance(checkpoint, dict):
        return f"holds a {type(checkpoint).__name__}, not a checkpoint dict"
    missing = [k for k in TRAINING_KEYS if k not in checkpoint]
    if missing:
        return f"no training state ({', '.join(missing)} missing): a weights-only checkpoint?"
    return None


def _priority(name: str) -> tuple[int, int]:
    match = HPC_NAME.match(name)
    if match:
        return (2, int(match.group(1)))
    return (1, 0) if name == "last.ckpt" else (0, 0)


def _modified(entry: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = entry.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return 0.0


# --------------------------------------------------------------------------- Slurm preemption


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
        if trainer.world_size > 1:
            if trainer.global_step % self.check_every_n_steps:
                return
            stop = trainer.strategy.reduce_boolean_decision(self.received, all=False)
        else:
            stop = self.received
        if stop:
            self.save_and_requeue(trainer)

    def save_and_requeue(self, trainer: L.Trainer) -> None:
        path = trainer.strategy.broadcast(self._next_path())
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes
        message, requeued = "", False
        if trainer.is_global_zero:
            self._remove_older(path)
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

    def _remove_older(self, keep: str) -> None:
        fs, folder = url_to_fs(self.dirpath)
        kept = keep.rsplit("/", 1)[-1]
        for name in fs.ls(folder, detail=False, refresh=True):
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if HPC_NAME.match(base) and base != kept:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(name)


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


# --------------------------------------------------------------------------- random state


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
