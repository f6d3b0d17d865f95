"""Checkpoint I/O: every checkpoint published whole or not at all, and the checkpoint a run
continues from.

- `AtomicCheckpointIO` writes through `train.storage.atomic_write`, on a local disk and on any
  fsspec URL: a process killed while it writes never leaves a torn file in place of the
  previous good one.
- `select_checkpoint`: `ckpt_path=URL` resumes from that file; `resume=auto` from the newest
  checkpoint in the run folder that loads (`hpc_ckpt_*`, `last`, `best`, ...).
"""

from __future__ import annotations

import contextlib
import logging
import re
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

from train.errors import UpweightError
from train.storage import atomic_write

log = logging.getLogger(__name__)
# The periodic `last` ModelCheckpoint is a second one; `ckpt_path="best"` rightly takes the
# first's (the `checkpoint` callback's) best, which Lightning warns about on every run.
warnings.filterwarnings("ignore", message=r".*configured with multiple `ModelCheckpoint`")

TRAINING_KEYS = ("state_dict", "loops", "optimizer_states")
HPC_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")
"""Slurm preemption checkpoints (`train.slurm.SlurmRequeue`), newest N first on resume."""


class ResumeError(UpweightError):
    """`resume`/`ckpt_path` cannot be honoured; the message names the folder or file."""


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
    """`torch.save(obj)` to `url` so that readers see the old file or the new one, never a part."""
    atomic_write(url, lambda handle: torch.save(obj, handle))


def plugins() -> list[Any]:
    """Trainer plugins: atomic checkpoint writes, and under Slurm the Slurm environment with
    Lightning's in-signal-handler requeue turned off (`train.slurm.SlurmRequeue` does it at a step
    boundary instead)."""
    found: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        found.append(SLURMEnvironment(auto_requeue=False))
    return found


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
