"""Each column's type, inferred from its cells, and the table's values converted to it.

First every cell gets a kind: missing (a null, or a text in `data.na_values` / `data.extra_na_values` after
stripping spaces), number (`12`, `-3.5`, `1e3`, or a number the source stores), datetime (ISO 8601 text such
as `2024-05-01` or `2024-05-01T13:45:00+02:00` that parses, or a date/time the source stores), boolean (a
boolean the source stores) or text (anything else). Then, on the column's non-missing cells, in order:

1. `data.column_types` and `data.id_columns` decide, when they name the column.
2. No cell: `empty` (every cell missing).
3. More than one kind: when text makes up more than half of the cells and of the distinct values, the
   column is text-like and everything in it is read as text (rule 6; codes such as `A1`, `10`, `XL`).
   Otherwise the column mixes types: an error naming the column and a row of each kind.
4. Numbers: `boolean` if the values are exactly 0 and 1; `id` if all distinct and either named like an id
   (`id`, `*_id`, `uuid`, `userId`, ...) or at least 10 consecutive integers; `integer` if all are whole
   numbers (below 2^53); else `numeric`.
5. Datetimes: `datetime`. Source booleans: `boolean`.
6. Text: `boolean` if the values, ignoring case, are true/false words (true/false, yes/no, t/f, y/n) with
   both a true and a false one; `id` if all distinct and named like an id, or all distinct without spaces
   and each with a digit (codes, UUIDs); `categorical` if at most `data.max_categories` distinct values
   and at most half as many as the cells (each value appears twice on average); else `text` (free text).

The converted values: numeric float64, integer Int64, boolean `boolean`, datetime datetime64 (naive, or
UTC when any cell has an offset; naive cells then count as UTC), the rest Python strings.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np

from sdpipe.tabular.sources import RawTable, TableError

if TYPE_CHECKING:
    import pandas as pd

    from sdpipe.tabular.config import TableDataConfig

MISSING, NUMBER, DATETIME, BOOLEAN, TEXT = "missing", "number", "datetime", "boolean", "text"
NUMBER_TEXT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
DATE_TEXT = r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
OFFSET = r"(?:Z|[+-]\d{2}:?\d{2})$"
TRUE_WORDS, FALSE_WORDS = {"true", "yes", "t", "y"}, {"false", "no", "f", "n"}
ID_MIN_RUN = 10  # consecutive distinct integers that make an unnamed column id-like
EXACT = 2.0**53  # whole floats below this are exact integers


@dataclass
class Column:
    name: str
    type: str  # numeric | integer | categorical | boolean | datetime | text | id | empty
    reason: str  # the rule that decided it
    storage: str  # how the source stores it


@dataclass
class Cells:
    """One column's cells sorted into kinds (aligned with the rows)."""

    values: pd.Series  # as read
    kinds: np.ndarray  # one of the kinds above per cell
    stripped: pd.Series  # text cells without surrounding spaces (others: None)


@dataclass
class TypedTable:
    """A table converted to its schema: `values[name]` and `missing[name]` per column."""

    columns: list[Column]
    values: dict[str, pd.Series]
    missing: dict[str, np.ndarray]
    rows: int


def infer_schema(raw: RawTable, cfg: TableDataConfig, forced: dict[str, str] | None = None) -> TypedTable:
    """Infer each column's type (or take it from `forced`, e.g. the main table's for its held-out table) and
    convert the values; `TableError` for mixed types, naming the column and a row of each kind."""
    frame = raw.frame
    if frame.shape[1] == 0:
        raise TableError(f"{raw.source}: the table has no columns")
    markers = cfg.missing_markers
    columns, values, missing = [], {}, {}
    for name in frame.columns:
        cells = classify(frame[name], markers, f"{raw.source}: column {name!r}")
        kind, reason = (forced[name], "as in the table") if forced else choose_type(str(name), cells, cfg, raw)
        columns.append(Column(str(name), kind, reason, raw.storage.get(name, "")))
        values[name] = convert(str(name), kind, cells, raw)
        missing[name] = cells.kinds == MISSING
    return TypedTable(columns, values, missing, len(frame))


def classify(values: pd.Series, markers: set[str], where: str) -> Cells:
    """Sort a column's cells into kinds (module docstring)."""
    import pandas as pd

    kinds = np.full(len(values), TEXT, dtype=object)
    types = values.map(type).to_numpy()
    null = values.isna().to_numpy()
    is_str = np.array([t is str for t in types], dtype=bool)
    stripped = pd.Series([None] * len(values), index=values.index, dtype=object)
    if is_str.any():
        s = values[is_str].str.strip()
        stripped[is_str] = s
        looks_number = s.str.fullmatch(NUMBER_TEXT).to_numpy(bool, copy=True)
        looks_date = s.str.fullmatch(DATE_TEXT).to_numpy(bool, copy=True)
        if looks_date.any():
            parsed = pd.to_datetime(s[looks_date], format="ISO8601", errors="coerce", utc=True)
            looks_date[looks_date] = parsed.notna().to_numpy()
        sub = np.where(looks_number, NUMBER, np.where(looks_date, DATETIME, TEXT))
        sub[s.isin(markers).to_numpy()] = MISSING
        kinds[is_str] = sub
    for t in set(types[~is_str & ~null]):
        kinds[types == t] = _kind_of_type(t, where)
    kinds[null] = MISSING
    return Cells(values, kinds, stripped)


def _kind_of_type(t: type, where: str) -> str:
    if t is bool or t is np.bool_:
        return BOOLEAN
    if issubclass(t, (int, float, Decimal, np.integer, np.floating)):
        return NUMBER
    if issubclass(t, (dt.datetime, dt.date, np.datetime64)):
        return DATETIME
    if issubclass(t, (bytes, bytearray, memoryview)):
        raise TableError(f"{where} holds binary data; leave it out of the query or table")
    if issubclass(t, (dict, list, tuple)):
        raise TableError(f"{where} holds nested values ({t.__name__}); flatten them into plain columns first")
    return TEXT  # times, durations, UUIDs ...: their text


def choose_type(name: str, cells: Cells, cfg: TableDataConfig, raw: RawTable) -> tuple[str, str]:
    """(type, the rule that decided it) for one column (module docstring)."""
    if name in cfg.column_types:
        return cfg.column_types[name], "set in data.column_types"
    if name in cfg.id_columns:
        return "id", "listed in data.id_columns"
    present = cells.kinds[cells.kinds != MISSING]
    if len(present) == 0:
        return "empty", "every cell is missing"
    kinds = set(present)
    if len(kinds) > 1:
        if not _text_like(cells):
            raise TableError(mixed_message(name, cells, raw))
        return _text_type(name, _as_text(cells)[cells.kinds != MISSING], cfg, mixed=True)
    (kind,) = kinds
    if kind == NUMBER:
        return _number_type(name, to_float(cells)[cells.kinds != MISSING])
    if kind == DATETIME:
        return "datetime", "ISO 8601 dates" if cells.stripped.notna().any() else "dates the source stores"
    if kind == BOOLEAN:
        return "boolean", "booleans the source stores"
    return _text_type(name, _as_text(cells)[cells.kinds != MISSING], cfg)


def _text_like(cells: Cells) -> bool:
    """More than half of the non-missing cells, and of their distinct values, are text."""
    present = cells.kinds != MISSING
    is_text = cells.kinds[present] == TEXT
    shown = _as_text(cells)[present]
    return bool(is_text.mean() > 0.5 and shown[is_text].nunique() > 0.5 * shown.nunique())


def mixed_message(name: str, cells: Cells, raw: RawTable) -> str:
    """Which kinds a column mixes, with the first row of each, and what to do."""
    examples = []  # (cells of that kind, kind, first row, its value)
    for kind in (NUMBER, DATETIME, BOOLEAN, TEXT):
        rows = np.flatnonzero(cells.kinds == kind)
        if len(rows):
            examples.append((len(rows), kind, int(rows[0]), str(cells.values.iloc[int(rows[0])])[:60]))
    shown = "; ".join(f"{kind} in {raw.where(i)}: {value!r}" for _, kind, i, value in examples)
    odd = min(examples)[3].strip()  # the rarest kind's first value: perhaps a marker of missing values
    return (
        f"{raw.source}: column {name!r} mixes types: {shown}. If {odd!r} means a missing value, add it with "
        f"--set 'data.extra_na_values=[\"{odd}\"]'; else fix those rows, or read the column as text with "
        f"--set data.column_types.{name}=text"
    )


def _number_type(name: str, x: np.ndarray) -> tuple[str, str]:
    whole = bool(np.all(np.isfinite(x)) and np.all(np.abs(x) < EXACT) and np.all(x == np.floor(x)))
    if not whole:
        return "numeric", "numbers, not all whole"
    distinct = np.unique(x)
    if len(distinct) == 2 and set(distinct.tolist()) == {0.0, 1.0}:
        return "boolean", "only the numbers 0 and 1"
    if len(distinct) == len(x) >= 2:
        if id_named(name):
            return "id", "whole numbers, all distinct, named like an id"
        if len(x) >= ID_MIN_RUN and distinct[-1] - distinct[0] + 1 == len(x):
            return "id", f"{len(x)} consecutive whole numbers, all distinct"
    return "integer", "whole numbers"


def _text_type(name: str, s: pd.Series, cfg: TableDataConfig, mixed: bool = False) -> tuple[str, str]:
    how = "mostly text" if mixed else "text"
    distinct = s.unique()
    lowered = {str(v).strip().lower() for v in distinct[:9]}
    if len(distinct) <= 8 and lowered <= TRUE_WORDS | FALSE_WORDS and lowered & TRUE_WORDS and lowered & FALSE_WORDS:
        return "boolean", "true/false words"
    unique = len(distinct) == len(s) >= 2
    if unique and id_named(name):
        return "id", f"{how}, all distinct, named like an id"
    if unique and not s.str.contains(r"\s").any() and s.str.contains(r"\d").all():
        return "id", f"{how}, all distinct codes (no spaces, each with a digit)"
    if len(distinct) <= cfg.max_categories and 2 * len(distinct) <= len(s):
        return "categorical", f"{how}, {len(distinct)} distinct values (at most data.max_categories), repeated"
    return "text", f"{how}, {len(distinct)} distinct values"


def id_named(name: str) -> bool:
    """`id`, `uuid`, `guid`, `key`, `pk`, `*_id`, `id_*`, `*_uuid`, `*_key`, `userId`, `userID`."""
    low = name.strip().lower()
    if low in ("id", "uuid", "guid", "key", "pk"):
        return True
    if low.endswith(("_id", "-id", " id", "_uuid", "_key")) or low.startswith(("id_", "id ")):
        return True
    return re.search(r"[a-z](Id|ID)$", name.strip()) is not None


def _as_text(cells: Cells) -> pd.Series:
    """Every cell as text: a text cell as read, a stored value as str() (missing: None)."""
    return cells.values.map(lambda v: v if isinstance(v, str) else str(v)).where(cells.kinds != MISSING, None)


def to_float(cells: Cells) -> np.ndarray:
    """The number cells as float64 (NaN elsewhere)."""
    import pandas as pd

    out = np.full(len(cells.kinds), np.nan)
    idx = np.flatnonzero(cells.kinds == NUMBER)
    if len(idx):
        picked = cells.stripped.iloc[idx].where(cells.stripped.iloc[idx].notna(), cells.values.iloc[idx])
        out[idx] = pd.to_numeric(picked.map(lambda v: v if isinstance(v, str) else float(v))).to_numpy(float)
    return out


def convert(name: str, kind: str, cells: Cells, raw: RawTable) -> pd.Series:
    """The column's values as its type; a cell that does not fit (possible when the type was set) is an
    error naming its row."""
    import pandas as pd

    present = cells.kinds != MISSING
    if kind in ("numeric", "integer"):
        _require(name, kind, cells, raw, cells.kinds == NUMBER)
        x = to_float(cells)
        if kind == "numeric":
            return pd.Series(x, dtype="float64")
        _require(name, kind, cells, raw, ~present | (np.isfinite(x) & (np.abs(x) < EXACT) & (x == np.floor(x))))
        return pd.Series(x, dtype="float64").astype("Int64")
    if kind == "boolean":
        return pd.Series(_booleans(name, cells, raw), dtype="boolean")
    if kind == "datetime":
        _require(name, kind, cells, raw, cells.kinds == DATETIME)
        return _datetimes(cells)
    return _as_text(cells).astype(object)  # categorical, text, id, empty


def _require(name: str, kind: str, cells: Cells, raw: RawTable, ok: np.ndarray) -> None:
    bad = np.flatnonzero((cells.kinds != MISSING) & ~ok)
    if len(bad):
        i = int(bad[0])
        raise TableError(
            f"{raw.source}: column {name!r} is {kind} but {raw.where(i)} has {str(cells.values.iloc[i])[:60]!r} "
            f"({len(bad)} such cells); fix them, mark them missing (data.extra_na_values) or change its type"
        )


def _booleans(name: str, cells: Cells, raw: RawTable) -> list[bool | None]:
    def one(v: Any) -> bool | None:
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        word = str(v).strip().lower()
        if word in TRUE_WORDS or word in ("1", "1.0"):
            return True
        if word in FALSE_WORDS or word in ("0", "0.0"):
            return False
        return None

    out = [None if k == MISSING else one(v) for v, k in zip(cells.values, cells.kinds, strict=True)]
    _require(name, "boolean", cells, raw, np.array([v is not None for v in out]))
    return out


def _datetimes(cells: Cells) -> pd.Series:
    import pandas as pd

    picked = cells.stripped.where(cells.stripped.notna(), cells.values).where(cells.kinds == DATETIME, None)
    texts = picked[picked.map(lambda v: isinstance(v, str))]
    aware = bool(texts.str.contains(OFFSET).any()) or any(
        getattr(v, "tzinfo", None) is not None for v in picked if not isinstance(v, str)
    )
    stamps = pd.to_datetime(picked, format="ISO8601" if len(texts) else None, utc=True)
    return stamps if aware else stamps.dt.tz_convert(None)
