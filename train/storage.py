"""Writing to any fsspec URL so that a reader sees the old file or the new one, never a part:
the one writer behind run files, reports, predictions and checkpoints.

Local disk: a hidden temporary file in the same folder, fsync, `os.replace` (atomic on POSIX),
fsync of the folder. Object stores: the bytes are produced in memory first and uploaded in one
request (the store publishes an object only when its upload completes; a partial multipart
upload is never visible). Other filesystems: a temporary name, then a rename (atomic where the
filesystem's rename is).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import IO, Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

# Stores that publish an object only when its upload completes (single PUT or a completed
# multipart upload): a writer that dies mid-upload leaves the previous object untouched.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci"})

Writer = Callable[[IO[bytes]], None]


class OutputError(SystemExit):
    """The output folder cannot be written (a file where a folder should be, no permission):
    ends the job like `sys.exit` with the path and the reason, not a traceback."""


def atomic_write(url: str, write: Writer) -> None:
    """Call `write(handle)` to produce the content of `url`, published whole or not at all."""
    try:
        _atomic_write(url, write)
    except (NotADirectoryError, FileExistsError, PermissionError, IsADirectoryError) as err:
        raise OutputError(
            f"error: cannot write {url}: {err.strerror or err} ({type(err).__name__}); the output "
            "folder (paths.output_dir, out) must be a writable folder or URL"
        ) from err


def _atomic_write(url: str, write: Writer) -> None:
    fs, path = url_to_fs(url)
    parent = fs._parent(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        _write_local(path, write)
        return
    if OBJECT_STORES & set(protocols(fs)):
        # In memory first: an error while producing must not close (= publish) a half upload.
        buffer = io.BytesIO()
        write(buffer)
        fs.pipe_file(path, buffer.getvalue())
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with fs.open(temporary, "wb") as handle:
            write(handle)
        fs.mv(temporary, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(temporary)
        raise


def _write_local(path: str, write: Writer) -> None:
    folder, name = os.path.split(os.path.abspath(path))
    # A leading dot and a .tmp suffix: never mistaken for a checkpoint by `resume=auto`.
    prefix = f".{name}."
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; match a plain open()
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(folder)
    # Leftovers of writers killed mid-write (their rename never happened).
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


def protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def write_bytes(url: str, data: bytes) -> None:
    atomic_write(url, lambda handle: handle.write(data))


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def write_json(url: str, payload: Mapping[str, Any]) -> None:
    write_text(url, json.dumps(_jsonable(payload), indent=2, sort_keys=True) + "\n")


def write_parquet(url: str, table: Any) -> None:
    """A pyarrow Table as one Parquet file."""
    import pyarrow.parquet as pq

    atomic_write(url, lambda handle: pq.write_table(table, handle))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN; null reads as "undefined" (e.g. one class only)
    return value


def remove_if_empty(url: str) -> None:
    """Undo the run folder Hydra made when the job fails before writing anything."""
    fs, path = url_to_fs(url)
    try:
        if fs.isdir(path) and not fs.ls(path):
            fs.rmdir(path)
    except OSError:
        pass
