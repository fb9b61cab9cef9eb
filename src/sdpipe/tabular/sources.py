"""Table sources: CSV and Parquet files (or folders of them) and SQL queries, each read into a `RawTable`.

A `RawTable` holds the cells as the source gave them, untyped: strings for CSV (sdpipe.tabular.csvfile),
Python values for Parquet and SQL (sdpipe.tabular.database); types are decided afterwards, the same way for
every source (sdpipe.tabular.schema). Rows are numbered from 1 (the first data row, the header not counted),
and `RawTable.where(i)` says where a row came from (file, line) for error messages. Nothing here writes to a
source: files are opened for reading, queries run in a read-only transaction that is rolled back.
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpipe.data.sources import SourceError

if TYPE_CHECKING:
    import pandas as pd

    from sdpipe.tabular.config import TableDataConfig

SUFFIXES = {".csv": "csv", ".tsv": "csv", ".tab": "csv", ".parquet": "parquet"}


class TableError(SourceError):
    """A table that cannot be validated as it is; the message names the row or column and what to do."""


@dataclass
class RawTable:
    """The cells of a table as read, before any typing (`frame` has object columns)."""

    frame: pd.DataFrame
    format: str  # csv | parquet | sql
    source: str  # an absolute path, or the database URL with its password masked
    files: list[str] = field(default_factory=list)  # the files read, in order (none for sql)
    file_starts: list[int] | None = None  # with several files: the row (0-based) where each one starts
    line_of_row: list[int] | None = None  # CSV: the line of its file where each row starts
    storage: dict[str, str] = field(default_factory=dict)  # column -> how the source stores it

    def file_index(self, i: int) -> int:
        """The index in `files` of the file holding row `i` (0-based)."""
        return 0 if self.file_starts is None else bisect.bisect_right(self.file_starts, i) - 1

    def where(self, i: int) -> str:
        """Row `i` (0-based) as a person finds it: 'row 7 (line 8)', 'row 7 (b.parquet, row 3)'."""
        parts = []
        if self.file_starts is not None:
            f = self.file_index(i)
            parts.append(Path(self.files[f]).name)
            if self.line_of_row is None:
                parts.append(f"row {i + 1 - self.file_starts[f]}")
        if self.line_of_row is not None:
            parts.append(f"line {self.line_of_row[i]}")
        return f"row {i + 1}" + (f" ({', '.join(parts)})" if parts else "")


def mask_url(url: str) -> str:
    """A database URL with its password replaced by ***, fit to print."""
    try:
        import sqlalchemy as sa

        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: mask what looks like user:password@
        return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def table_files(path: Path) -> tuple[str, list[Path]]:
    """The format and sorted files of a table path: one .csv/.tsv/.parquet file, or a folder of one kind."""
    if not path.exists():
        raise TableError(f"{path}: no such file or folder")
    if path.is_file():
        fmt = SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise TableError(f"{path}: a table is a .csv, .tsv or .parquet file (or a folder of them)")
        return fmt, [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
    if not files:
        raise TableError(f"{path}: an empty folder; put .csv or .parquet files in it")
    fmt = SUFFIXES.get(files[0].suffix.lower())
    others = [p.name for p in files if SUFFIXES.get(p.suffix.lower()) != fmt]
    if fmt is None or others:
        raise TableError(
            f"{path}: a table folder holds files of one kind (.csv/.tsv or .parquet); found "
            f"{', '.join(([] if fmt else [files[0].name]) + others[:5])}"
        )
    return fmt, files


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def is_table_source(path: str) -> bool:
    """Does `path` look like a table rather than images? .csv/.tsv files (or folders of them), and .parquet
    files (or folders) with no image column (binary, `{bytes, path}` or a Hugging Face Image feature).
    Cheap: looks at the first 50 files of a folder and at most one Parquet schema, imports no pandas."""
    p = Path(path)
    if not p.is_dir():
        fmt = SUFFIXES.get(p.suffix.lower())
        return fmt == "csv" or (fmt == "parquet" and p.is_file() and not _has_image_column(p))
    sample = _first_files(p, 50)
    kinds = {SUFFIXES.get(f.suffix.lower()) for f in sample}
    if len(kinds) != 1 or None in kinds:
        return False
    return kinds == {"csv"} or not _has_image_column(sample[0])


def _first_files(root: Path, n: int) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
        if len(found) >= n:
            break
    return found[:n]


def _has_image_column(file: Path) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
    except (OSError, pa.ArrowException):
        return False  # not readable: the table reader says why
    hf = (schema.metadata or {}).get(b"huggingface", b"")
    if b'"Image"' in hf:
        return True
    for f in schema:
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
            return True
        if _image_struct(f.type):
            return True
    return False


def load_table(cfg: TableDataConfig, path: str | None = None) -> RawTable:
    """Read the table `cfg` names (or the file/folder `path`, e.g. the held-out table) into a `RawTable`."""
    if path is None and cfg.db_url is not None:
        from sdpipe.tabular.database import read_query

        assert cfg.sql is not None
        return read_query(cfg.db_url, cfg.sql)
    where = path or cfg.path
    if where is None:
        raise TableError("no table given: a .csv/.parquet file or folder, or --db URL --sql QUERY")
    root = Path(os.path.abspath(where))
    fmt, files = table_files(root)
    if cfg.format not in ("auto", fmt) and path is None:
        raise TableError(f"{root}: data.format is {cfg.format} but the files are {fmt}")
    if fmt == "csv":
        from sdpipe.tabular.csvfile import read_csv_files

        table = read_csv_files(files, cfg)
    else:
        table = read_parquet_files(files)
    table.source = str(root)
    return table


def read_parquet_files(files: list[Path]) -> RawTable:
    """Parquet files with the same columns, one after the other, as Python values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except (OSError, pa.ArrowException) as exc:
            raise TableError(f"{f}: not a readable Parquet file ({exc})") from None
    first = tables[0]
    for f, t in zip(files[1:], tables[1:], strict=True):
        if t.column_names != first.column_names:
            raise TableError(
                f"{f}: columns {t.column_names} differ from {files[0].name}'s {first.column_names}; "
                "a folder's files must have the same columns"
            )
    storage = {}
    for name in first.column_names:
        for f, t in zip(files, tables, strict=True):
            _check_parquet_type(name, t.schema.field(name).type, f)
        storage[name] = " / ".join(sorted({str(t.schema.field(name).type) for t in tables}))
    frame = _frame({name: [v for t in tables for v in t.column(name).to_pylist()] for name in first.column_names})
    return RawTable(frame, "parquet", "", [str(f) for f in files], starts([t.num_rows for t in tables]), None, storage)


def starts(counts: list[int]) -> list[int] | None:
    """Where each file's rows start (0-based), given how many each has; None for a single file."""
    if len(counts) < 2:
        return None
    out, total = [], 0
    for n in counts:
        out.append(total)
        total += n
    return out


def _check_parquet_type(name: str, arrow_type: Any, file: Path) -> None:
    import pyarrow as pa

    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type) or _image_struct(arrow_type):
        raise TableError(
            f"{file}: column {name!r} holds binary data ({arrow_type}); a table of images is validated as "
            "images (--kind parquet)"
        )
    if pa.types.is_nested(arrow_type):
        raise TableError(f"{file}: column {name!r} is nested ({arrow_type}); flatten it into plain columns first")


def _image_struct(arrow_type: Any) -> bool:
    """A `{bytes, path}` struct: how Hugging Face `datasets` stores images."""
    import pyarrow as pa

    return pa.types.is_struct(arrow_type) and any(
        arrow_type.field(i).name == "bytes" for i in range(arrow_type.num_fields)
    )


def _frame(columns: dict[str, list[Any]]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in columns.items()})
