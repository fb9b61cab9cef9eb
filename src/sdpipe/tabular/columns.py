"""One source column of a table, fitted for the model and reversed: `ColumnSpec` and what each type does.

`ColumnSpec` records everything learnt from the training rows about one column (type, the source's pandas
dtype, which encoded columns hold it, the category set, the range, the rounding) as plain JSON values, so
a saved preprocessor decodes without the training data. sdpipe.tabular.preprocess assembles the specs into
the encoded layout and scales the numbers; the functions here turn one column's cells into numbers or
category indices and back:

* numeric, integer: the value as float64 (NaN where missing); decoded clipped to the training range and
  rounded (integers to whole numbers, decimals to the most decimals seen in training).
* datetime: seconds since 1970-01-01 (UTC for tz-aware columns) as float64; decoded clipped to the training
  range and rounded to the coarsest unit every training value is a whole number of (day, hour, minute,
  second, millisecond, microsecond), then shown in the source's time zone. Derived features (month,
  weekday, hour) are extra category indices, ignored by decode.
* categorical, boolean: the index in the training category set (sorted; booleans False, True), a missing
  cell the extra last index when training had missing cells; a value outside the set is an error.
* id: not modelled; decode makes new ids of the source's kind that no training id can equal (`new_ids`).
* text, empty, and a column without a single value in training: not modelled; decoded as all missing.

Training ids and texts are never stored, so a saved preprocessor cannot leak them.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sdpipe.tabular.sources import TableError

if TYPE_CHECKING:
    import pandas as pd

NUMBER_TYPES = ("numeric", "integer", "datetime")  # role "number": one scaled float
CATEGORY_TYPES = ("categorical", "boolean")  # role "category": one index
DERIVED_SIZES = {"month": 12, "weekday": 7, "hour": 24}  # datetime features: category count
MAX_DECIMALS = 10  # a numeric column needing more decimals than this is not rounded
US_STEPS = (86_400_000_000, 3_600_000_000, 60_000_000, 1_000_000, 1_000, 1)  # day ... microsecond, in us
ID_PATTERN = re.compile(r"(.*\D)?(\d+)")  # a prefix, then the number: C-1001, user_7, 42
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
OTHER_ID_PREFIX = "synthetic-"


class PreprocessError(TableError):
    """A frame that cannot be encoded as the preprocessor was fitted; the message names the column."""


@dataclass
class ColumnSpec:
    """One source column as fitted on the training rows. Indices point into `EncodedTable.numeric`
    (`numeric`) and `EncodedTable.categorical` (`category`, `missing`, `derived`); None: not encoded."""

    name: str
    type: str  # the schema type (sdpipe.tabular.schema)
    dtype: str  # the source's pandas dtype, restored on decode
    role: str  # "number" | "category" | "id" | "none" (not modelled: decoded all missing)
    has_missing: bool = False  # training had missing cells: missingness is modelled
    numeric: int | None = None  # the scaled value (numeric, integer, datetime)
    category: int | None = None  # the category index (categorical, boolean)
    missing: int | None = None  # a number's missing indicator: 0 observed, 1 missing
    derived: dict[str, int] = field(default_factory=dict)  # datetime feature -> its index (ignored by decode)
    categories: list[Any] | None = None  # the training category set, in index order (JSON values)
    minimum: float | None = None  # training range; datetime: microseconds since 1970
    maximum: float | None = None
    decimals: int | None = None  # decode rounds to this many decimals (integer: 0; None: no rounding)
    step_us: int | None = None  # datetime: decoded values are whole multiples of this
    id_kind: str | None = None  # "integer" | "pattern" | "uuid" | "other" (see new_ids)
    id_prefix: str = ""
    id_width: int = 0  # zero-padding of a pattern id's number (0: none)
    id_next: int = 0  # the first new id's number: one past the largest training one
    na: str = "nan"  # an object column's missing cell: "nan", "none" or "na" (pd.NA), as in training

    @property
    def size(self) -> int | None:
        """The category count of a categorical or boolean column (the missing category included)."""
        return None if self.categories is None else len(self.categories) + int(self.has_missing)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ColumnSpec:
        return cls(**data)


def fit_column(name: str, kind: str, values: pd.Series, derived: Sequence[str]) -> ColumnSpec:
    """A column's spec from its training cells (indices are assigned by the caller)."""
    missing = values.isna().to_numpy()
    spec = ColumnSpec(name, kind, str(values.dtype), "none", has_missing=bool(missing.any()))
    present = values[~missing]
    if missing.any():
        first = values[missing].iloc[0]
        spec.na = "none" if first is None else "nan" if isinstance(first, float) else "na"
    if kind == "id":
        spec.role = "id"
        _fit_id(spec, present)
    elif len(present) == 0 or kind not in NUMBER_TYPES + CATEGORY_TYPES:
        spec.has_missing = False  # text, empty, or nothing seen: decoded all missing anyway
    elif kind in CATEGORY_TYPES:
        spec.role = "category"
        found = {_plain(v) for v in present}
        odd = next((v for v in found if not isinstance(v, (str, int, float, bool))), None)
        if odd is not None:
            raise PreprocessError(
                f"column {name!r}: category {odd!r} is a {type(odd).__name__}, which cannot be recorded; "
                "categories are text, numbers or booleans: convert the column's values to text first"
            )
        spec.categories = sorted(found, key=lambda v: (type(v).__name__, v))
    elif kind == "datetime":
        spec.role = "number"
        us = datetime_us(name, values, spec)[~missing]
        spec.minimum, spec.maximum = int(us.min()), int(us.max())
        spec.step_us = next(s for s in US_STEPS if np.all(us % s == 0))
        spec.derived = dict.fromkeys(derived, -1)
    else:
        spec.role = "number"
        x = numbers(spec, values, missing)[~missing]
        spec.minimum, spec.maximum = float(x.min()), float(x.max())
        spec.decimals = 0 if kind == "integer" else _decimals(x)
    return spec


def _plain(v: Any) -> Any:
    """A cell as a plain Python value (numpy scalars unwrapped), as JSON stores it."""
    return v.item() if isinstance(v, np.generic) else v


def _decimals(x: np.ndarray) -> int | None:
    """The fewest decimals that write every value exactly (None: more than MAX_DECIMALS)."""
    return next((d for d in range(MAX_DECIMALS + 1) if np.array_equal(np.round(x, d), x)), None)


def numbers(spec: ColumnSpec, values: pd.Series, missing: np.ndarray) -> np.ndarray:
    """A number column's cells as float64, NaN where missing: the value, or a datetime's seconds since 1970."""
    import pandas as pd

    if spec.type == "datetime":
        seconds = datetime_us(spec.name, values, spec) / 1e6
        seconds[missing] = np.nan
        return seconds
    x = pd.to_numeric(values.where(~missing, None), errors="coerce").astype("float64").to_numpy(copy=True)
    x[missing] = np.nan
    _refuse(spec.name, values, ~missing & np.isnan(x), "is not a number")
    _refuse(spec.name, values, np.isinf(x), "is infinite; mark it missing or drop the row")
    return x


def datetime_us(name: str, values: pd.Series, spec: ColumnSpec) -> np.ndarray:
    """A datetime column's cells as whole microseconds since 1970 (UTC for tz-aware columns), 0 where missing."""
    import pandas as pd

    missing = values.isna().to_numpy()
    if isinstance(values.dtype, pd.DatetimeTZDtype) or values.dtype.kind == "M":
        stamps = values
    else:
        aware = isinstance(pd.api.types.pandas_dtype(spec.dtype), pd.DatetimeTZDtype)
        stamps = pd.to_datetime(values, errors="coerce", utc=aware, format="ISO8601")
        _refuse(name, values, ~missing & stamps.isna().to_numpy(), "is not a datetime")
    fitted = pd.api.types.pandas_dtype(spec.dtype)
    if isinstance(stamps.dtype, pd.DatetimeTZDtype) != isinstance(fitted, pd.DatetimeTZDtype):
        raise PreprocessError(
            f"column {name!r}: datetimes are {stamps.dtype} but the preprocessor was fitted on {fitted}; "
            "give them with a time zone exactly when the training table had one"
        )
    if isinstance(stamps.dtype, pd.DatetimeTZDtype):
        stamps = stamps.dt.tz_convert(None)
    us = stamps.to_numpy().astype("datetime64[us]").astype("int64")
    us[missing] = 0
    return us


def _refuse(name: str, values: pd.Series, bad: np.ndarray, what: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        shown = f"{_plain(values.iloc[i])!r}, which {what} ({int(bad.sum())} such cells)"
        raise PreprocessError(f"column {name!r}: row {i + 1} has {shown}")


def category_codes(spec: ColumnSpec, values: pd.Series, missing: np.ndarray) -> np.ndarray:
    """A categorical or boolean column's cells as indices into the training category set; a missing cell
    is the missing category, or 0 when training had none (the caller marks it unobserved). A value the
    training rows never held is an error: the model cannot represent it."""
    assert spec.categories is not None
    index = {v: i for i, v in enumerate(spec.categories)}  # Python equality: 1 finds 1.0, "1" does not find 1
    codes = np.full(len(values), len(spec.categories) if spec.has_missing else 0, dtype=np.int64)
    rows = np.flatnonzero(~missing)
    found = [index.get(_plain(v), -1) for v in values.iloc[rows]]
    codes[rows] = found
    unseen = rows[np.asarray(found, dtype=np.int64) < 0] if len(rows) else rows
    if len(unseen):
        row = int(unseen[0])
        shown = ", ".join(repr(c) for c in spec.categories[:10]) + (" ..." if len(spec.categories) > 10 else "")
        raise PreprocessError(
            f"column {spec.name!r}: row {row + 1} has {_plain(values.iloc[row])!r}, a category the training rows "
            f"never held ({len(unseen)} such cells; known: {shown}); the model cannot represent it: map it to a "
            "known category or mark it missing"
        )
    return codes


def datetime_feature(spec: ColumnSpec, feature: str, values: pd.Series, missing: np.ndarray) -> np.ndarray:
    """A derived datetime feature as a category index (month 0-11, weekday 0-6 from Monday, hour 0-23) in
    the column's own time zone; 0 where the datetime is missing."""
    import pandas as pd

    us = datetime_us(spec.name, values, spec)
    stamps = pd.Series(pd.to_datetime(us, unit="us", utc=True))
    tz = getattr(pd.api.types.pandas_dtype(spec.dtype), "tz", None)
    stamps = stamps.dt.tz_convert(tz) if tz is not None else stamps.dt.tz_convert(None)
    got = getattr(stamps.dt, {"weekday": "day_of_week"}.get(feature, feature)) - (1 if feature == "month" else 0)
    return np.where(missing, 0, got.to_numpy()).astype(np.int64)


def decode_number(spec: ColumnSpec, x: np.ndarray, missing: np.ndarray) -> pd.Series:
    """Unscaled values (any finite floats) as the source column: clipped to the training range, rounded,
    missing where `missing`, in the source's dtype."""
    import pandas as pd

    assert spec.minimum is not None and spec.maximum is not None
    if spec.type == "datetime":
        assert spec.step_us is not None
        us = np.clip(x * 1e6, spec.minimum, spec.maximum)
        us = np.clip(np.rint(us / spec.step_us).astype(np.int64) * spec.step_us, spec.minimum, spec.maximum)
        stamps = pd.Series(pd.to_datetime(us, unit="us", utc=True))
        tz = getattr(pd.api.types.pandas_dtype(spec.dtype), "tz", None)
        stamps = stamps.dt.tz_convert(tz) if tz is not None else stamps.dt.tz_convert(None)
        return restore_dtype(stamps.where(~missing), spec)
    x = np.clip(x, spec.minimum, spec.maximum)
    if spec.decimals is not None:
        x = np.round(x, spec.decimals)
    x = np.where(missing, np.nan, x)
    if spec.type == "integer":
        return restore_dtype(pd.Series(x, dtype="float64").astype("Int64"), spec)
    return restore_dtype(pd.Series(x, dtype="float64"), spec)


def decode_category(spec: ColumnSpec, codes: np.ndarray) -> pd.Series:
    """Category indices (already within 0..size-1) as the source's values; the missing category as missing."""
    import pandas as pd

    assert spec.categories is not None
    table = np.array([*spec.categories, None], dtype=object)
    values = table[np.minimum(codes, len(spec.categories))]
    return restore_dtype(pd.Series(values, dtype=object), spec)


def all_missing(spec: ColumnSpec, n: int) -> pd.Series:
    """An unmodelled column (text, empty): every cell missing, in the source's dtype where it allows that."""
    import pandas as pd

    return restore_dtype(pd.Series([None] * n, dtype=object), spec)


def _fit_id(spec: ColumnSpec, present: pd.Series) -> None:
    """How new ids are made (see new_ids); only the largest number is kept, never an id itself."""
    import pandas as pd

    spec.has_missing = False
    if len(present) and pd.api.types.is_numeric_dtype(present.dtype):
        spec.id_kind, spec.id_next = "integer", int(np.max(present.to_numpy(float))) + 1
        return
    texts = [str(v) for v in present]
    matches = [ID_PATTERN.fullmatch(t) for t in texts]
    if texts and all(m is not None for m in matches):
        prefixes = {m.group(1) or "" for m in matches if m is not None}
        digits = [m.group(2) for m in matches if m is not None]
        if len(prefixes) == 1:
            widths = {len(d) for d in digits}
            spec.id_kind, spec.id_prefix = "pattern", prefixes.pop()
            spec.id_width = widths.pop() if len(widths) == 1 else 0
            spec.id_next = max(int(d) for d in digits) + 1
            return
    if texts and all(UUID_TEXT.fullmatch(t) for t in texts):
        spec.id_kind = "uuid"
        return
    spec.id_kind, spec.id_prefix, spec.id_next = "other", OTHER_ID_PREFIX, 1


def new_ids(spec: ColumnSpec, n: int, start: int) -> pd.Series:
    """n new ids, numbered start, start+1, ... (pass the rows already generated to keep them unique):

    * integer ids: the number after the largest training id, counting up (42 -> 43, 44, ...);
    * ids of one prefix and a number (`C-1001`, `user_7`, `"12"`): the same prefix and zero-padding, the
      number counting up after the largest training one (`C-1013`, ...);
    * UUIDs: version-4 UUIDs from sha256 of the number (122 bits: no training UUID is met in practice);
    * anything else: `synthetic-1`, `synthetic-2`, ...
    """
    import pandas as pd

    numbers_ = range(spec.id_next + start, spec.id_next + start + n)
    if spec.id_kind == "integer":
        return restore_dtype(pd.Series(list(numbers_), dtype="int64"), spec)
    if spec.id_kind == "uuid":
        digests = (hashlib.sha256(f"sdpipe-id:{k}".encode()).digest()[:16] for k in numbers_)
        made = [str(uuid.UUID(bytes=d, version=4)) for d in digests]
    else:
        made = [f"{spec.id_prefix}{str(k).zfill(spec.id_width)}" for k in numbers_]
    return restore_dtype(pd.Series(made, dtype=object), spec)


def restore_dtype(values: pd.Series, spec: ColumnSpec) -> pd.Series:
    """`values` as the source's dtype; an integer or boolean numpy dtype that cannot hold a missing cell
    becomes its pandas nullable counterpart (Int64, boolean) where one is missing. In an object column a
    missing cell is what the training rows used (None, NaN or pd.NA)."""
    import pandas as pd

    target = pd.api.types.pandas_dtype(spec.dtype)
    if isinstance(target, np.dtype) and target.kind in "iub" and bool(values.isna().any()):
        nullable = "boolean" if target.kind == "b" else f"{'U' if target.kind == 'u' else ''}Int{8 * target.itemsize}"
        target = pd.api.types.pandas_dtype(nullable)
    if target == np.dtype(object):
        cells = values.astype(object).to_numpy(copy=True)
        cells[values.isna().to_numpy()] = {"nan": np.nan, "none": None, "na": pd.NA}[spec.na]
        return pd.Series(cells, dtype=object)
    return values.astype(target)
