"""CSV files read strictly, every cell kept as its text, with errors that name the row and line.

The file's bytes are decoded whole with `data.encoding` (no replacement characters: a byte that does not
decode stops the run, naming its offset, row and line). Records are parsed with Python's `csv` module in
strict mode; the first record is the header. Every record must have as many fields as the header; blank
lines are skipped. Several files (a folder) must have the same header; their rows follow one another.
"""

from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from sdpipe.tabular.sources import RawTable, TableError, _frame, starts

if TYPE_CHECKING:
    from sdpipe.tabular.config import TableDataConfig


def read_csv_files(files: list[Path], cfg: TableDataConfig) -> RawTable:
    """CSV files with the same header, one after the other, as text cells."""
    header: list[str] | None = None
    cells: list[list[str]] = []
    lines: list[int] = []
    counts = []
    for f in files:
        names, rows, row_lines = read_csv(f, cfg)
        if header is not None and names != header:
            raise TableError(f"{f}: header {names} differs from {files[0].name}'s {header}; use the same columns")
        header = names
        cells.extend(rows)
        lines.extend(row_lines)
        counts.append(len(rows))
    assert header is not None
    columns = {name: [row[j] for row in cells] for j, name in enumerate(header)}
    storage = dict.fromkeys(header, "csv text")
    return RawTable(_frame(columns), "csv", "", [str(f) for f in files], starts(counts), lines, storage)


def delimiter_for(path: Path, cfg: TableDataConfig) -> str:
    if cfg.delimiter is not None:
        return cfg.delimiter
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def read_csv(path: Path, cfg: TableDataConfig) -> tuple[list[str], list[list[str]], list[int]]:
    """(header, rows, first line of each row) of one CSV file, or `TableError` saying what is wrong where."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TableError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not raw.strip():
        raise TableError(f"{path}: the file is empty ({len(raw)} bytes); nothing to validate")
    delimiter = delimiter_for(path, cfg)
    text = decode(raw, cfg.encoding, path, delimiter)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    line = 1  # where the next record starts
    try:
        for record in reader:
            start, line = line, reader.line_num + 1
            if not record:
                continue  # a blank line
            if header is None:
                header = _header(record, path)
                continue
            if len(record) != len(header):
                raise TableError(_ragged(path, len(rows) + 1, start, len(record), len(header), delimiter))
            rows.append(record)
            lines.append(start)
    except csv.Error as exc:
        raise TableError(
            f"{path}: row {len(rows) + 1} (line {line}): {exc}; quote fields holding the delimiter, a quote "
            "or a line break, and double the quotes inside them"
        ) from None
    if header is None or not rows:
        raise TableError(f"{path}: no rows, only a header ({', '.join(header or [])}); nothing to validate")
    return header, rows, lines


def _header(record: list[str], path: Path) -> list[str]:
    names = [name.strip() or f"column_{j + 1}" for j, name in enumerate(record)]  # blank: named by position
    seen: dict[str, int] = {}
    for j, name in enumerate(names):
        if name in seen:
            raise TableError(
                f"{path}: the header names column {name!r} twice (columns {seen[name] + 1} and {j + 1}); "
                "rename one of them"
            )
        seen[name] = j
    return names


def _ragged(path: Path, row: int, line: int, fields: int, expected: int, delimiter: str) -> str:
    shown = {",": "comma", "\t": "tab", ";": "semicolon"}.get(delimiter, repr(delimiter))
    hint = (
        f"a value holding a {shown} must be quoted"
        if fields > expected
        else "a value is missing; leave an empty field between delimiters for a missing value"
    )
    return f"{path}: row {row} (line {line}) has {fields} fields, expected {expected} like the header; {hint}"


def decode(raw: bytes, encoding: str, path: Path, delimiter: str) -> str:
    """`raw` decoded with `encoding` (a UTF-8 BOM dropped), or `TableError` naming the first bad byte."""
    utf8 = codecs.lookup(encoding).name == "utf-8"
    codec = "utf-8-sig" if utf8 else encoding
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        offset = exc.start
        row, line = _row_at(raw, offset, codec, delimiter)
        where = "in the header" if row == 0 else f"row {row}"
        other = "latin-1" if utf8 else "utf-8"
        raise TableError(
            f"{path}: not valid {encoding} text: byte 0x{raw[offset]:02x} at offset {offset} ({where}, line "
            f"{line}); re-save the file as {encoding}, or name its encoding, e.g. --set data.encoding={other}"
        ) from None


def _row_at(raw: bytes, offset: int, codec: str, delimiter: str) -> tuple[int, int]:
    """The data row (0 = the header) and line holding byte `offset`, from the records before it."""
    line = raw.count(b"\n", 0, offset) + 1
    prefix = raw[:offset].decode(codec, errors="replace")
    records = [r for r in csv.reader(io.StringIO(prefix, newline=""), delimiter=delimiter) if r]
    partial = bool(prefix) and not prefix.endswith(("\n", "\r"))
    return len(records) - 1 + (0 if partial else 1), line
