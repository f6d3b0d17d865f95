"""`python -m train.predict ckpt=URL data.test=URL out=URL keep=[user_id,video_id]`: score a
data set with a trained checkpoint and write Parquet.

Input is streamed in row batches (memory bounded by `batch_size`, never by the data set), ids
are hashed or looked up in the checkpoint's vocabularies, list columns cut to their last
`max_len` elements (CSV cells split by `data.list_delimiter`) and dense features standardised
exactly as in training (statistics from the checkpoint), and only the feature columns and the
`keep` columns are read: behaviours and oracle columns need not exist. With `procs=N` the input (files, and row groups of Parquet
files) is cut into N contiguous pieces by size, one per process, and each writes one part:
`out/part-00000.parquet`, ... read in name order they hold the input rows in input order.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from typing import Any, TypeVar

import hydra
import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf

from train.checkpoint import load
from train.data.features import DataError, FeatureSpec, model_inputs
from train.data.io import TableFormat, expand, inspect, read_chunks
from train.errors import UpweightError
from train.parts import PartWriter, PredictError, discard, prepare_output, publish
from train.secrets import safe_url


@dataclass(frozen=True)
class Piece:
    """One file, or some row groups of one Parquet file: the unit handed to a process."""

    url: str
    row_groups: tuple[int, ...] | None = None
    """Parquet row groups to read; None reads the whole file."""
    size: int = 1
    """Bytes on storage: what the split into processes balances."""


@dataclass(frozen=True)
class Job:
    """Everything one scoring process needs (picklable, so it crosses to spawned processes)."""

    ckpt: str
    pieces: Sequence[Piece]
    out: str
    keep: Sequence[str]
    batch_size: int
    device: str
    table_format: TableFormat
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    data_storage_options: Mapping[str, Any] = field(default_factory=dict)
    trusted_models: Sequence[str] = ()
    threads: int = 0


@dataclass
class Summary:
    rows: int
    files: int
    parts: list[str]
    seconds: float

    def __str__(self) -> str:
        rate = self.rows / max(self.seconds, 1e-9)
        return (
            f"scored {self.rows} rows from {self.files} file(s) in {self.seconds:.1f} s "
            f"({rate:,.0f} rows/s) -> {len(self.parts)} part(s)"
        )


def predict(
    ckpt: str,
    data: str | Sequence[str],
    out: str,
    keep: Sequence[str] = (),
    batch_size: int = 65536,
    procs: int = 1,
    device: str = "auto",
    table_format: TableFormat | None = None,
    storage_options: Mapping[str, Any] | None = None,
    data_storage_options: Mapping[str, Any] | None = None,
    trusted_models: Sequence[str] = (),
    overwrite: bool = False,
) -> Summary:
    """Score every row of `data` (files, folders, globs; any fsspec URL) and write Parquet to
    `out`: a `.parquet` file (one process) or a folder of parts."""
    start = time.perf_counter()
    table_format = table_format or TableFormat()
    storage_options = dict(storage_options or {})
    data_options = dict(storage_options if data_storage_options is None else data_storage_options)
    if batch_size < 1 or procs < 1:
        raise PredictError(f"batch_size and procs must be >= 1, got {batch_size} and {procs}")
    device = _resolve_device(device)
    # Read the checkpoint first: a bad one fails before anything is listed or written.
    checkpoint = load(ckpt, storage_options, trusted_models)
    # The list columns are the checkpoint's: CSV cells of them are split as in training.
    table_format = replace(table_format, list_columns=tuple(checkpoint.spec.sequences))
    clash = [k for k in keep if k in checkpoint.scorer.outputs]
    if clash or len(set(keep)) != len(keep):
        raise PredictError(
            f"keep={list(keep)}: names must be distinct and not {checkpoint.scorer.outputs} "
            "(the output columns)"
        )
    single = out.rstrip("/").lower().endswith(".parquet")
    created = prepare_output(out, single, overwrite, storage_options)
    jobs: list[Job] = []
    try:
        files = expand(data, data_options)
        pieces = _pieces(files, table_format, data_options, split=procs > 1)
        groups = [g for g in _split(pieces, procs) if g]
        if single and len(groups) > 1:
            raise PredictError(
                f"out={safe_url(out)} names one file; with procs={procs} give a folder "
                "(one part per process)"
            )
        base = out.rstrip("/")
        targets = [out] if single else [f"{base}/part-{i:05d}.parquet" for i in range(len(groups))]
        threads = max(1, (os.cpu_count() or 1) // len(groups)) if len(groups) > 1 else 0
        jobs = [
            Job(
                ckpt=ckpt,
                pieces=group,
                out=target,
                keep=list(keep),
                batch_size=batch_size,
                device=_device_for(device, i),
                table_format=table_format,
                storage_options=storage_options,
                data_storage_options=data_options,
                trusted_models=list(trusted_models),
                threads=threads,
            )
            for i, (group, target) in enumerate(zip(groups, targets, strict=True))
        ]
        if len(jobs) == 1:
            rows = [score_job(jobs[0], checkpoint.scorer, checkpoint.spec)]
        else:
            # spawn: fsspec filesystems and torch threads do not survive a fork safely.
            with ProcessPoolExecutor(len(jobs), mp_context=get_context("spawn")) as pool:
                rows = list(pool.map(score_job, jobs))
        if sum(rows) == 0:
            shown = [safe_url(u) for u in ([data] if isinstance(data, str) else data)]
            raise DataError(f"data.test={shown}: no rows to score in {len(files)} file(s)")
    except BrokenProcessPool as err:
        discard(out, [j.out for j in jobs], created, storage_options)
        raise PredictError(
            f"a scoring process died ({err}); killed for memory? lower batch_size"
        ) from err
    except BaseException:
        # A half-scored data set must not pass for a result: drop this run's parts.
        discard(out, [j.out for j in jobs], created, storage_options)
        raise
    written = [job.out for job, n in zip(jobs, rows, strict=True) if n]
    publish(out, written, single, storage_options)
    return Summary(sum(rows), len(files), written, time.perf_counter() - start)


def score_job(
    job: Job, scorer: torch.nn.Module | None = None, spec: FeatureSpec | None = None
) -> int:
    """Score `job.pieces` into one Parquet part; returns the rows written (0: no part)."""
    if job.threads:
        torch.set_num_threads(job.threads)
    if scorer is None or spec is None:
        checkpoint = load(job.ckpt, job.storage_options, job.trusted_models)
        scorer, spec = checkpoint.scorer, checkpoint.spec
    scorer = scorer.to(job.device).eval()
    outputs: list[str] = list(scorer.outputs)
    columns = list(dict.fromkeys([*spec.categorical, *spec.sequences, *spec.dense, *job.keep]))
    inputs = (
        (piece.url, table, *model_inputs(table, spec, safe_url(piece.url)))
        for piece in job.pieces
        for table in read_batches(
            piece, columns, job.table_format, job.data_storage_options, job.batch_size
        )
    )
    writer = PartWriter(job.out, job.storage_options)
    # Reading + hashing (one thread ahead) and writing (one thread behind) overlap the forward.
    with ThreadPoolExecutor(1, thread_name_prefix="predict-writer") as background:
        written: Future | None = None
        try:
            for source, table, categorical, dense, sequences in ahead(inputs):
                if sequences is not None:
                    sequences = sequences.to(job.device)
                with torch.inference_mode():
                    probs = scorer(categorical.to(job.device), dense.to(job.device), sequences)
                probs = probs.float().cpu().numpy()
                result = {k: table.column(k) for k in job.keep}
                result |= {name: pa.array(probs[:, j]) for j, name in enumerate(outputs)}
                if written is not None:
                    written.result()
                written = background.submit(writer.write, pa.table(result), source)
            if written is not None:
                written.result()
        except BaseException:
            if written is not None:
                written.cancel()
                wait([written])
            writer.abort()
            raise
    return writer.close()


T = TypeVar("T")


def ahead(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """`items`, produced by a background thread up to `depth` ahead: reading and hashing the
    next batch overlaps the forward pass of this one (Arrow, numpy and torch release the GIL).
    An error in the thread is raised here; leaving the loop early stops the thread."""
    buffer: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as err:
            put((end, err))

    thread = threading.Thread(target=work, name="predict-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, err = buffer.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def read_batches(
    piece: Piece,
    columns: Sequence[str],
    table_format: TableFormat,
    storage_options: Mapping[str, Any],
    batch_size: int,
) -> Iterator[pa.Table]:
    """`columns` of one piece in tables of `batch_size` rows (the last one shorter): Parquet row
    groups and CSV blocks, as `train.data.io` streams them, cut or joined."""
    pending: list[pa.Table] = []
    rows = 0
    for chunk in read_chunks(
        piece.url, columns, table_format, dict(storage_options), piece.row_groups
    ):
        pending.append(chunk)
        rows += chunk.num_rows
        while rows >= batch_size:
            table = pa.concat_tables(pending)
            yield table.slice(0, batch_size)
            pending, rows = [table.slice(batch_size)], rows - batch_size
    if rows:
        yield pa.concat_tables(pending)


def _pieces(
    files: Sequence[str],
    table_format: TableFormat,
    storage_options: Mapping[str, Any],
    split: bool,
) -> list[Piece]:
    """Files, and with `split` the row groups of Parquet files, sized in bytes on storage."""
    if not split:
        return [Piece(url) for url in files]
    pieces = []
    for url in files:
        info = inspect(url, table_format, dict(storage_options))
        size = max(info.size, 1)
        if info.row_groups is None:
            pieces.append(Piece(url, None, size))
            continue
        total = max(sum(info.row_groups), 1)
        pieces += [
            Piece(url, (g,), max(1, size * rows // total)) for g, rows in enumerate(info.row_groups)
        ]
    return pieces


def _split(pieces: Sequence[Piece], parts: int) -> list[list[Piece]]:
    """Contiguous groups of near-equal size, so parts in name order keep the input order."""
    total = sum(p.size for p in pieces)
    groups: list[list[Piece]] = [[] for _ in range(parts)]
    done = 0
    for piece in pieces:
        middle = done + piece.size / 2
        groups[min(parts - 1, math.floor(middle * parts / total))].append(piece)
        done += piece.size
    return groups


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PredictError(f"device={device}: CUDA is not available here; use device=cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise PredictError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    return device


def _device_for(device: str, process: int) -> str:
    """Processes share the GPUs round-robin when `device=cuda` names none in particular."""
    if device == "cuda":
        return f"cuda:{process % torch.cuda.device_count()}"
    return device


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    options = OmegaConf.to_container(cfg.storage_options, resolve=True)
    assert isinstance(data, dict) and isinstance(options, dict)
    try:
        summary = predict(
            ckpt=cfg.ckpt,
            data=data["test"],
            out=cfg.out,
            keep=list(cfg.keep),
            batch_size=cfg.batch_size,
            procs=cfg.procs,
            device=cfg.device,
            table_format=TableFormat(
                data["format"],
                data["delimiter"],
                data["header"],
                tuple(data["column_names"]),
                data.get("list_delimiter", "|"),
            ),
            storage_options=options,
            data_storage_options=data["storage_options"],
            trusted_models=list(cfg.trusted_models),
            overwrite=cfg.overwrite,
        )
    except UpweightError as err:
        sys.exit(f"error: {err}")
    print(f"{summary} -> {safe_url(cfg.out)}")


if __name__ == "__main__":
    main()
