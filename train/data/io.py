"""Reading impression tables from any fsspec URL: Parquet (only the needed columns, one row
group at a time) or CSV/TSV (with or without a header, one block at a time).

Every failure becomes a `DataError` naming the URL (credentials stripped) and what was
expected: a glob that matches nothing, a missing bucket, bad credentials, an unreachable
endpoint, an empty or corrupt file, a missing column.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from train.config_checks import boolean, column_list, one_of, optional, require
from train.data.features import DataConfigError, DataError
from train.secrets import safe_url, scrub
from train.secrets import strip_query as _strip_query

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
CSV_BLOCK_BYTES = 8 << 20
PARQUET_BATCH_ROWS = 65_536
"""Parquet row groups are decoded in batches of this many rows and CSV parsed in blocks of
CSV_BLOCK_BYTES, so a reader holds a few MB whatever the row-group size. Chunk boundaries (and
so the order in which statistics are summed) depend on them, identically in both modes."""
READ_ONLY_PROTOCOLS = ("http", "https")
DELIMITER = (
    lambda v: isinstance(v, str) and len(v) == 1 and v not in '\r\n"',
    "one character (e.g. ',', ';' or a tab), not a quote or a line break",
)


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
    list_delimiter: str = "|"
    """Separates the elements of a list cell in CSV files (`a|b|c`; an empty cell: no element)."""
    list_columns: Sequence[str] = field(default_factory=tuple)
    """Columns read as lists: in CSV, text cells split by `list_delimiter`."""

    def __post_init__(self) -> None:
        error = DataConfigError
        if self.delimiter == "\\t":  # `data.delimiter='\t'` on a command line: a tab
            object.__setattr__(self, "delimiter", "\t")
        if not isinstance(self.list_delimiter, str) or not self.list_delimiter:
            raise error(
                f"data.list_delimiter={self.list_delimiter!r}: expected a non-empty string "
                "(e.g. '|')"
            )
        object.__setattr__(self, "list_columns", tuple(self.list_columns))
        require("data.format", self.format, one_of("auto", "parquet", "csv"), error)
        require("data.delimiter", self.delimiter, optional(DELIMITER), error)
        require("data.header", self.header, boolean(), error)
        names = column_list("data.column_names", self.column_names, error)
        object.__setattr__(self, "column_names", tuple(names))
        if not self.header and not self.column_names:
            raise error(
                "data.header=false needs data.column_names: expected the file's column names, "
                "in order"
            )

    def kind(self, path: str) -> str:
        if self.format != "auto":
            return self.format
        lower = _strip_query(path).lower()
        if lower.endswith(PARQUET_SUFFIXES):
            return "parquet"
        if lower.endswith(CSV_SUFFIXES):
            return "csv"
        raise DataError(
            f"{safe_url(path)}: cannot tell the format from the suffix; expected one of "
            f"{PARQUET_SUFFIXES + CSV_SUFFIXES}, or set data.format=parquet|csv"
        )

    def csv_delimiter(self, url: str) -> str:
        if self.delimiter:
            return self.delimiter
        return "\t" if _strip_query(url).lower().split(".gz")[0].endswith((".tsv", ".txt")) else ","


@dataclass(frozen=True)
class FileInfo:
    """One data file as seen before reading its rows."""

    url: str
    kind: str
    """parquet | csv"""
    schema: pa.Schema
    """Parquet: from the footer; CSV: types inferred from the first block."""
    row_groups: tuple[int, ...] | None
    """Rows per Parquet row group; None for CSV (counted when read)."""
    size: int
    """Bytes on storage."""


def _fail(url: str, what: str, err: BaseException | None, options: Mapping | None) -> DataError:
    detail = f" ({type(err).__name__}: {err})" if err is not None else ""
    return DataError(scrub(f"{safe_url(url)}: {what}{detail}", options))


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """The fsspec filesystem and the bare path of `url` (credentials from options or env)."""
    return url_to_fs(url, **dict(storage_options or {}))


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def expand(
    urls: str | Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """A file, folder, glob or list of them -> the data files, in a stable (sorted) order.

    Folders are searched recursively for .parquet/.csv/.tsv/.txt files (names starting with
    `_` or `.`, such as `_SUCCESS`, are skipped). http(s) URLs name single files.
    """
    if isinstance(urls, str):
        urls = [urls]
    files: list[str] = []
    for url in urls:
        url = str(url)
        proto = protocol(url)
        try:
            fs, path = filesystem(url, storage_options)
            if proto in READ_ONLY_PROTOCOLS:
                if not fs.exists(url):
                    raise _fail(url, "no such file (HTTP)", None, storage_options)
                files.append(url)
                continue
            if any(ch in path for ch in "*?["):
                found = sorted(fs.glob(path))
                if not found:
                    raise _fail(url, "the glob matches no file", None, storage_options)
            elif fs.isdir(path):
                found = sorted(
                    p
                    for p in fs.find(path)
                    if p.lower().endswith(PARQUET_SUFFIXES + CSV_SUFFIXES)
                    and not os.path.basename(p).startswith(("_", "."))
                )
                if not found:
                    raise _fail(
                        url, "the folder holds no .parquet/.csv/.tsv file", None, storage_options
                    )
            elif fs.exists(path):
                found = [path]
            else:
                raise _missing(url, fs, path, storage_options)
        except DataError:
            raise
        except FileNotFoundError as err:
            raise _missing(url, None, "", storage_options) from err
        except PermissionError as err:
            raise _fail(url, "access denied: check the credentials", err, storage_options) from err
        except Exception as err:  # botocore/aiohttp/google errors share no base class
            raise _fail(url, "cannot list it", err, storage_options) from err
        files += [_unstrip(proto, p) for p in found]
    return files


def _missing(url: str, fs: Any, path: str, options: Mapping | None) -> DataError:
    proto = protocol(url)
    if fs is not None and proto in ("s3", "s3a", "gs", "gcs", "az", "abfs") and path:
        bucket = path.split("/", 1)[0]
        try:
            exists = fs.exists(bucket)
        except Exception:
            exists = True
        if not exists:
            return _fail(url, f"the bucket {bucket!r} does not exist", None, options)
    return _fail(url, "no such file or folder", None, options)


def inspect(
    url: str,
    table_format: TableFormat,
    storage_options: Mapping[str, Any] | None = None,
) -> FileInfo:
    """Schema, row-group sizes and byte size of one file, reading only its footer (Parquet) or
    its first block (CSV)."""
    kind = table_format.kind(url)
    fs, path = filesystem(url, storage_options)
    try:
        size = int(fs.size(path) if protocol(url) not in READ_ONLY_PROTOCOLS else fs.size(url))
    except FileNotFoundError as err:
        raise _fail(url, "no such file", err, storage_options) from err
    except PermissionError as err:
        raise _fail(url, "access denied: check the credentials", err, storage_options) from err
    except Exception:
        size = -1  # some HTTP servers do not say; the read below still checks the content
    if size == 0:
        raise _fail(
            url, f"the file is empty (0 bytes); expected a {kind} file", None, storage_options
        )
    if kind == "parquet":
        with _guard(url, kind, storage_options), _open(url, storage_options) as handle:
            parquet = pq.ParquetFile(handle)
            meta = parquet.metadata
            groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            schema = parquet.schema_arrow
        if sum(groups) == 0:
            raise _fail(url, "the file has no rows", None, storage_options)
        return FileInfo(url, kind, schema, groups, size)
    with (
        _guard(url, kind, storage_options),
        _csv_reader(url, table_format, None, storage_options) as reader,
    ):
        schema = reader.schema
    for column in table_format.list_columns:
        if column in schema.names:
            at = schema.get_field_index(column)
            schema = schema.set(at, pa.field(column, pa.list_(pa.string())))
    return FileInfo(url, kind, schema, None, size)


def read_chunks(
    url: str,
    columns: Sequence[str],
    table_format: TableFormat,
    storage_options: Mapping[str, Any] | None = None,
    row_groups: Sequence[int] | None = None,
    dictionary: Sequence[str] = (),
) -> Iterator[pa.Table]:
    """`columns` of one file as a sequence of tables: PARQUET_BATCH_ROWS-row batches of each
    Parquet row group in turn (all, or `row_groups`), or CSV blocks. `dictionary` names string
    columns to read dictionary-encoded (cheaper hashing)."""
    kind = table_format.kind(url)
    columns = list(columns)
    if kind == "parquet":
        with _guard(url, kind, storage_options), _open(url, storage_options) as handle:
            present = set(dictionary)
            parquet = pq.ParquetFile(handle, read_dictionary=list(present) or None)
            _require(url, columns, parquet.schema_arrow.names)
            indices = range(parquet.num_row_groups) if row_groups is None else row_groups
            for i in indices:
                for batch in parquet.iter_batches(
                    PARQUET_BATCH_ROWS, row_groups=[i], columns=columns, use_threads=False
                ):
                    yield pa.Table.from_batches([batch])
        return
    with _guard(url, kind, storage_options):
        _require(url, columns, _csv_header(url, table_format, storage_options))
        with _csv_reader(url, table_format, columns, storage_options) as reader:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as err:
                    what = _csv_column_error(err, reader.schema)
                    raise _fail(url, what, None, storage_options) from err
                yield split_lists(pa.Table.from_batches([batch]), table_format)


def split_lists(table: pa.Table, table_format: TableFormat) -> pa.Table:
    """CSV text cells of the list columns -> lists of text elements (empty or null: no list)."""
    for column in table_format.list_columns:
        if column not in table.column_names:
            continue
        at = table.column_names.index(column)
        text = table.column(column)
        blank = pc.equal(pc.utf8_trim_whitespace(text), "")
        text = pc.if_else(blank, pa.scalar(None, text.type), text)
        table = table.set_column(
            at, column, pc.split_pattern(text, pattern=table_format.list_delimiter)
        )
    return table


def read_table(
    url: str,
    columns: Sequence[str],
    table_format: TableFormat,
    storage_options: Mapping[str, Any] | None = None,
) -> pa.Table:
    """`columns` of one whole file; errors name the file and what was expected."""
    chunks = list(read_chunks(url, columns, table_format, storage_options))
    if not chunks or sum(c.num_rows for c in chunks) == 0:
        raise _fail(url, "the file has no rows", None, storage_options)
    return pa.concat_tables(chunks)


class _guard:
    """Turns storage and format errors raised while reading into named `DataError`s."""

    def __init__(self, url: str, kind: str, options: Mapping | None) -> None:
        self.url, self.kind, self.options = url, kind, options

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> bool:
        if err is None or isinstance(err, DataError | GeneratorExit):
            return False
        if isinstance(err, FileNotFoundError):
            raise _fail(self.url, "no such file", err, self.options) from err
        if isinstance(err, PermissionError):
            raise _fail(
                self.url, "access denied: check the credentials", err, self.options
            ) from err
        if isinstance(err, pa.ArrowInvalid | pa.ArrowException | OSError | ValueError):
            raise _fail(self.url, f"not a readable {self.kind} file", err, self.options) from err
        if isinstance(err, Exception):
            raise _fail(self.url, "cannot read it", err, self.options) from err
        return False


def _open(url: str, options: Mapping | None) -> Any:
    if protocol(url) in ("", "file"):
        # Local files go through Arrow's own reader (no Python-level read calls).
        return pa.OSFile(url.removeprefix("file://"), "rb")
    fs, path = filesystem(url, options)
    return fs.open(url if protocol(url) in READ_ONLY_PROTOCOLS else path, "rb")


@contextmanager
def _csv_reader(
    url: str,
    table_format: TableFormat,
    columns: Sequence[str] | None,
    options: Mapping | None,
) -> Iterator[pacsv.CSVStreamingReader]:
    with fsspec.open(url, "rb", compression="infer", **dict(options or {})) as handle:
        try:
            reader = pacsv.open_csv(
                handle,
                read_options=pacsv.ReadOptions(
                    column_names=None if table_format.header else list(table_format.column_names),
                    block_size=CSV_BLOCK_BYTES,
                    use_threads=False,
                ),
                parse_options=pacsv.ParseOptions(delimiter=table_format.csv_delimiter(url)),
                # List cells stay text, to be split: never inferred as numbers.
                convert_options=pacsv.ConvertOptions(
                    include_columns=list(columns) if columns is not None else None,
                    column_types={c: pa.string() for c in table_format.list_columns},
                ),
            )
        except pa.ArrowInvalid as err:
            if "Empty CSV file" in str(err):
                raise _fail(
                    url, "the file is empty; expected a CSV header and rows", None, options
                ) from err
            if "In CSV column #" in str(err):
                raise _fail(url, _csv_column_error(err, None), None, options) from err
            raise
        try:
            yield reader
        finally:
            reader.close()


def _csv_header(url: str, table_format: TableFormat, options: Mapping | None) -> list[str]:
    """The column names of a CSV file: from config (no header) or its first line."""
    if not table_format.header:
        return list(table_format.column_names)
    with fsspec.open(url, "rt", compression="infer", newline="", **dict(options or {})) as handle:
        line = handle.readline()
    if not line.strip():
        raise _fail(url, "the file is empty; expected a CSV header and rows", None, options)
    return next(csv.reader([line], delimiter=table_format.csv_delimiter(url)))


def _csv_column_error(err: pa.ArrowInvalid, schema: pa.Schema | None) -> str:
    text = str(err)
    match = re.search(r"In CSV column #(\d+): (.*)", text, re.S)
    if not match:
        return f"not a readable csv file ({text})"
    index = int(match.group(1))
    name = schema.names[index] if schema is not None and index < len(schema.names) else None
    where = f"column {name!r}" if name else f"column #{index}"
    return (
        f"{where} holds a value that does not fit the type inferred from the first block "
        f"({match.group(2).strip()}); expected one type per column (numbers in dense and "
        "behaviour columns)"
    )


def _require(url: str, wanted: Sequence[str], present: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(
            f"{safe_url(url)}: missing column(s) {missing}; the data config reads {list(wanted)}, "
            f"the file has {list(present)}"
        )


def _unstrip(proto: str, path: str) -> str:
    if not proto or proto == "file":
        return path
    return f"{proto}://{path}"
