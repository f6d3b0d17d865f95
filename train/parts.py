"""The output of a scoring job: one Parquet part per process, streamed to `<part>.tmp` and
published (renamed into place) only when every process has finished, so a failed run never
replaces or mixes into earlier outputs, and an existing output is kept unless asked."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from train.data.features import DataError
from train.data.io import filesystem
from train.errors import UpweightError
from train.secrets import safe_url


class PredictError(UpweightError):
    """A prediction job that cannot run as configured (output location, procs, keep)."""


TMP = ".tmp"
"""Suffix of a part being written; predict renames every part once all are complete."""


class PartWriter:
    """One Parquet part, streamed to `<part>.tmp`; `predict` publishes the parts only when every
    process has finished, so a failed run never replaces or mixes into earlier outputs."""

    def __init__(self, url: str, storage_options: Mapping[str, Any]) -> None:
        self.fs, path = filesystem(url, dict(storage_options))
        self.target = path + TMP
        self.handle: Any = None
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table, source: str) -> None:
        if self.writer is None:
            self.handle = self.fs.open(self.target, "wb")
            self.writer = pq.ParquetWriter(self.handle, table.schema)
        elif table.schema != self.writer.schema:
            try:
                table = table.cast(self.writer.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
                raise DataError(
                    f"{source}: kept columns have types {table.schema}, earlier files had "
                    f"{self.writer.schema}; one output part needs one type per column"
                ) from err
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> int:
        if self.writer is not None:
            self.writer.close()
            self.handle.close()
        return self.rows

    def abort(self) -> None:
        # The error being raised matters more than the cleanup's.
        with contextlib.suppress(Exception):
            self.close()


def prepare_output(
    out: str, single: bool, overwrite: bool, storage_options: Mapping[str, Any]
) -> bool:
    """Refuse to replace earlier outputs unless asked, and fail on an unwritable location
    before any data is read. True when the output folder was created here."""
    fs, path = filesystem(out, dict(storage_options))
    try:
        if single:
            if fs.exists(path) and not overwrite:
                raise PredictError(f"out={safe_url(out)} exists; pass overwrite=true to replace it")
            parent = path.rstrip("/").rsplit("/", 1)[0]
            if parent:
                fs.makedirs(parent, exist_ok=True)
            return False
        else:
            if fs.isfile(path):
                raise PredictError(
                    f"out={safe_url(out)} is a file; give a folder or a .parquet file name"
                )
            if fs.isdir(path) and fs.ls(path) and not overwrite:
                raise PredictError(
                    f"out={safe_url(out)} is a folder that is not empty; pass overwrite=true to "
                    "replace its part-*.parquet files, or give a new folder"
                )
            created = not fs.isdir(path)
            fs.makedirs(path, exist_ok=True)
            return created
    except PredictError:
        raise
    except OSError as err:
        raise PredictError(
            f"out={safe_url(out)}: cannot write there ({type(err).__name__}: {err})"
        ) from err


def publish(
    out: str, written: Sequence[str], single: bool, storage_options: Mapping[str, Any]
) -> None:
    """Rename the finished parts into place, then drop parts of an earlier, larger run."""
    fs, path = filesystem(out, dict(storage_options))
    final = [filesystem(w, dict(storage_options))[1] for w in written]
    for target in final:
        fs.mv(target + TMP, target)
    if single:
        return
    for entry in fs.ls(path, detail=False):
        entry = entry.rstrip("/")
        name = entry.rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(".parquet") and entry not in final:
            fs.rm(entry)


def discard(
    out: str, targets: Sequence[str], created: bool, storage_options: Mapping[str, Any]
) -> None:
    """Remove what a failed run wrote (its .tmp parts, the folder it made); nothing else."""
    fs, path = filesystem(out, dict(storage_options))
    try:
        for target in targets:
            partial = filesystem(target, dict(storage_options))[1] + TMP
            if fs.exists(partial):
                fs.rm(partial)
        if created and fs.isdir(path) and not fs.ls(path):
            fs.rmdir(path)
    except OSError:
        pass  # the error being raised matters more than the cleanup's
