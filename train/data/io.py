"""Reading impression tables from any fsspec URL: Parquet (only the needed columns) or
CSV/TSV (with or without a header)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from train.data.features import DataError

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")


@dataclass(frozen=True)
class TableFormat:
    """How files are laid out; `auto` picks Parquet or CSV by suffix."""

    format: str = "auto"
    """auto | parquet | csv"""
    delimiter: str | None = None
    """CSV field separator; None: tab for .tsv/.txt, comma otherwise."""
    header: bool = True
    """False: the CSV has no header row and `column_names` names its columns in order."""
    column_names: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.format not in ("auto", "parquet", "csv"):
            raise DataError(f"data.format must be auto, parquet or csv, got {self.format!r}")
        if not self.header and not self.column_names:
            raise DataError("data.header=false needs data.column_names (the columns in order)")

    def kind(self, path: str) -> str:
        if self.format != "auto":
            return self.format
        lower = path.lower()
        if lower.endswith(PARQUET_SUFFIXES):
            return "parquet"
        if lower.endswith(CSV_SUFFIXES):
            return "csv"
        raise DataError(
            f"{path}: cannot tell the format from the suffix; expected one of "
            f"{PARQUET_SUFFIXES + CSV_SUFFIXES}, or set data.format=parquet|csv"
        )


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """The fsspec filesystem and the bare path of `url` (credentials from options or env)."""
    return url_to_fs(url, **(storage_options or {}))


def expand(urls: str | Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """A file, folder, glob or list of them -> the data files, in a stable (sorted) order."""
    if isinstance(urls, str):
        urls = [urls]
    files: list[str] = []
    for url in urls:
        fs, path = filesystem(url, storage_options)
        protocol = _protocol(url)
        try:
            if any(ch in path for ch in "*?["):
                found = sorted(fs.glob(path))
                if not found:
                    raise DataError(f"{url}: the glob matches no file")
            elif fs.isdir(path):
                found = sorted(
                    p
                    for p in fs.find(path)
                    if p.lower().endswith(PARQUET_SUFFIXES + CSV_SUFFIXES)
                    and not os.path.basename(p).startswith(("_", "."))
                )
                if not found:
                    raise DataError(f"{url}: the folder holds no .parquet/.csv/.tsv file")
            elif fs.exists(path):
                found = [path]
            else:
                raise DataError(f"{url}: no such file or folder")
        except DataError:
            raise
        except (PermissionError, OSError) as err:
            raise DataError(f"{url}: cannot list it ({type(err).__name__}: {err})") from err
        files += [_unstrip(protocol, p) for p in found]
    return files


def read_table(
    url: str,
    columns: Sequence[str],
    table_format: TableFormat,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """Read `columns` of one file; errors name the file and what was expected."""
    kind = table_format.kind(url)
    fs, path = filesystem(url, storage_options)
    try:
        if kind == "parquet":
            with fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                present = parquet.schema_arrow.names
                _require(url, columns, present)
                table = parquet.read(columns=list(columns))
        else:
            delimiter = table_format.delimiter or (
                "\t" if url.lower().split(".gz")[0].endswith((".tsv", ".txt")) else ","
            )
            with fsspec.open(url, "rb", compression="infer", **(storage_options or {})) as handle:
                table = pacsv.read_csv(
                    handle,
                    read_options=pacsv.ReadOptions(
                        column_names=list(table_format.column_names) or None,
                        autogenerate_column_names=False,
                    )
                    if not table_format.header
                    else None,
                    parse_options=pacsv.ParseOptions(delimiter=delimiter),
                    convert_options=pacsv.ConvertOptions(
                        include_columns=[c for c in columns],
                        include_missing_columns=True,
                    ),
                )
            _require(url, columns, _present_csv_columns(table, columns))
    except DataError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"{url}: no such file") from err
    except PermissionError as err:
        raise DataError(f"{url}: access denied ({err})") from err
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{url}: not a readable {kind} file ({err})") from err
    if table.num_rows == 0:
        raise DataError(f"{url}: the file has no rows")
    return table


def _present_csv_columns(table: pa.Table, wanted: Sequence[str]) -> list[str]:
    # include_missing_columns fills absent columns with nulls of type null: treat as missing
    return [c for c in wanted if not pa.types.is_null(table.column(c).type) or table.num_rows == 0]


def _require(url: str, wanted: Sequence[str], present: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(
            f"{url}: missing column(s) {missing}; the data config reads {list(wanted)}, "
            f"the file has {list(present)}"
        )


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else ""


def _unstrip(protocol: str, path: str) -> str:
    if not protocol or protocol == "file":
        return path
    return f"{protocol}://{path}"
