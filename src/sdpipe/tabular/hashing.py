"""Row hashes, splits and the dataset id of a typed table.

Two hashes per row, both sha256 over the row's cells written as canonical text:

* `row_sha256`: every column, exactly (numbers as Python writes the float, whole numbers as integers,
  datetimes in ISO 8601, booleans as true/false, text as read). The same table gives the same hashes from
  CSV, Parquet or SQL; any change of a value changes it. Exact duplicate rows share it.
* `content_sha256`: the row *normalised*, id-like columns (and the split column) left out: text NFKC-
  normalised, case-folded, spaces collapsed and stripped; numbers rounded to `data.near_digits` significant
  digits. Rows equal after this are near-identical (e.g. the same record under another id, or `Paris ` vs
  `paris`).

A row's split is `sdpipe.data.splits.assign_split` of its content hash (salted with `data.split_salt` when
set), as images split by their pixel hash: near-identical rows always land in the same split, adding rows
never moves a row, and raising a fraction only moves rows out of train.

The dataset id is `sha256:` and 16 hex digits of a hash of the schema (column names and types), the row
count and the sum modulo 2^256 of sha256(row_sha256, split) over the rows: independent of row order, changed
by any value, type, column name or split.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sdpipe.data.splits import assign_split

if TYPE_CHECKING:
    import pandas as pd

    from sdpipe.tabular.schema import TypedTable

NULL = "\x00"  # a missing cell
NUMERIC = ("numeric", "integer")


def exact_cells(kind: str, values: pd.Series, missing: Any) -> list[str]:
    """One column's cells as exact canonical text."""
    if kind == "numeric":
        text = [repr(float(v)) for v in values.fillna(0.0)]
    elif kind == "integer":
        text = [str(int(v)) for v in values.fillna(0)]
    elif kind == "boolean":
        text = ["true" if v else "false" for v in values.fillna(False)]
    elif kind == "datetime":
        text = [v.isoformat() if v is not None and v == v else "" for v in values]
    else:
        text = [str(v) for v in values]
    return [NULL if m else t for t, m in zip(text, missing, strict=True)]


def normal_cells(kind: str, values: pd.Series, missing: Any, digits: int) -> list[str]:
    """One column's cells normalised (module docstring)."""
    if kind in NUMERIC:
        text = [_round(float(v), digits) for v in values.astype("float64").fillna(0.0)]
    elif kind in ("boolean", "datetime"):
        return exact_cells(kind, values, missing)
    else:
        text = [normal_text(str(v)) for v in values]
    return [NULL if m else t for t, m in zip(text, missing, strict=True)]


def _round(x: float, digits: int) -> str:
    text = f"{x:.{digits}g}"
    return "0" if text in ("-0", "0") else text


def normal_text(s: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


def row_digests(columns: Sequence[list[str]], n: int) -> list[str]:
    """sha256 of each row's cells (each written as its length and text, so no separator is ambiguous)."""
    if not columns:
        return [hashlib.sha256(b"").hexdigest()] * n
    return [
        hashlib.sha256("".join(f"{len(c)}:{c}" for c in cells).encode("utf-8", "surrogatepass")).hexdigest()
        for cells in zip(*columns, strict=True)
    ]


def exact_hashes(table: TypedTable) -> list[str]:
    cols = [exact_cells(c.type, table.values[c.name], table.missing[c.name]) for c in table.columns]
    return row_digests(cols, table.rows)


def content_hashes(table: TypedTable, digits: int, leave_out: Iterable[str] = ()) -> list[str]:
    skip = set(leave_out)
    cols = [
        normal_cells(c.type, table.values[c.name], table.missing[c.name], digits)
        for c in table.columns
        if c.type != "id" and c.name not in skip
    ]
    return row_digests(cols, table.rows)


def split_of(content_sha256: str, validation: float, test: float, salt: str = "") -> str:
    """A row's split from its content hash (and salt): `assign_split`, as for images."""
    if salt:
        content_sha256 = hashlib.sha256(f"{salt}\x1f{content_sha256}".encode()).hexdigest()
    return assign_split(content_sha256, validation, test)


def dataset_id(table: TypedTable, row_sha256: list[str], splits: list[str]) -> str:
    """The content id of the validated table (module docstring)."""
    total = 0
    for sha, split in zip(row_sha256, splits, strict=True):
        total = (total + int.from_bytes(hashlib.sha256(f"{sha}\x1f{split}".encode()).digest(), "big")) % 2**256
    schema = "\x1f".join(f"{c.name}\x1e{c.type}" for c in table.columns)
    return "sha256:" + hashlib.sha256(f"{schema}:{len(row_sha256)}:{total:064x}".encode()).hexdigest()[:16]
