"""The settings of table validation, typed: `TableDataConfig` (the `data:` section of a table config).

Anything unknown, mistyped or out of range is rejected by `load_table_config` with `TableConfigError`, naming
the key and what it accepts, before any row is read. See docs/tables.md.
"""

from __future__ import annotations

import codecs
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ColumnType = Literal["numeric", "integer", "categorical", "boolean", "datetime", "text", "id"]
COLUMN_TYPES: tuple[str, ...] = ("numeric", "integer", "categorical", "boolean", "datetime", "text", "id")

# pandas' default missing-value markers (read_csv's na_values), compared with each cell after stripping spaces
DEFAULT_NA_VALUES = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
]  # fmt: skip


class TableConfigError(ValueError):
    """Table settings that cannot be used; the message names the key and what it accepts."""


class TableDataConfig(BaseModel):
    """Where a table comes from, how its cells are read, how its rows split, and what its checks flag.

    The source is `path` (a .csv/.tsv file, a .parquet file, or a folder of either) or `db_url` + `sql` (a
    query through SQLAlchemy). `format: auto` tells them apart by the file suffix, or `sql` when `db_url`
    is set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    source: Literal["table"] = "table"  # tells a table config from an image one
    format: Literal["auto", "csv", "parquet", "sql"] = "auto"
    path: str | None = None  # a .csv/.tsv/.parquet file, or a folder of them
    db_url: str | None = None  # SQLAlchemy URL, e.g. sqlite:///data.db, postgresql+psycopg://user:pw@host/db
    sql: str | None = None  # the query whose rows are the table (read-only; never changes the database)
    validated_dir: str | None = None  # the --out folder of `sdpipe data validate` that training reads
    # a separate held-out table (same columns): its rows that also appear in the table are reported as leaks
    heldout_path: str | None = None

    # reading CSV
    encoding: str = "utf-8"  # a leading UTF-8 byte-order mark is dropped
    delimiter: str | None = None  # None: "," for .csv, tab for .tsv/.tab
    na_values: list[str] = Field(default_factory=lambda: list(DEFAULT_NA_VALUES))  # cells meaning "missing"
    extra_na_values: list[str] = Field(default_factory=list)  # more of them, e.g. [unknown, "?", "-"]

    # types (sdpipe.tabular.schema): every other column's type is inferred
    id_columns: list[str] = Field(default_factory=list)  # always id-like (left out of the split hash)
    column_types: dict[str, ColumnType] = Field(default_factory=dict)  # forced types, e.g. {zip: categorical}
    max_categories: int = Field(default=50, ge=2)  # a text column with at most this many values is categorical

    # splits (by a hash of each row's normalised content; sdpipe.tabular.hashing)
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    test_fraction: float = Field(default=0.2, ge=0, lt=1)  # the held-out split the judge compares with
    split_salt: str = ""  # mixed into the split hash: another salt, another (still content-decided) split
    split_column: str | None = None  # a column giving each row's split (train/validation/test) instead

    # checks (sdpipe.tabular.checks)
    outlier_k: float = Field(default=3.5, gt=0)  # outlier: |x - median| > k * 1.4826 * MAD
    near_digits: int = Field(default=6, ge=1, le=17)  # significant digits numbers keep in the normalised rows

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r} (e.g. utf-8, latin-1, cp1252, utf-16)") from None
        return value

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, value: str | None) -> str | None:
        if value is not None and len(value) != 1:
            raise ValueError(f"the delimiter must be one character, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TableDataConfig:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must leave a training split (sum < 1)")
        if (self.db_url is None) != (self.sql is None):
            raise ValueError("db_url and sql go together: a database URL and the query to run on it")
        if self.db_url is not None and self.path is not None:
            raise ValueError("give either path (a file or folder) or db_url + sql, not both")
        return self

    @property
    def missing_markers(self) -> set[str]:
        """Every text that means a missing cell (compared after stripping spaces; case counts)."""
        return {v.strip() for v in (*self.na_values, *self.extra_na_values)}

    @property
    def shown_source(self) -> str:
        """The source as a person reads it (the URL without its password)."""
        if self.db_url is not None:
            from sdpipe.tabular.sources import mask_url

            return mask_url(self.db_url)
        return str(self.path)


class TablePreprocessConfig(BaseModel):
    """How a table's columns become model inputs and back (sdpipe.tabular.preprocess, docs/tables.md
    "Pre-processing"). Fitted on the training split only; the fitted result is saved with the model."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # numbers and datetimes: "quantile" maps each column through its training quantiles onto a standard
    # normal (sklearn QuantileTransformer(output_distribution="normal"), as TabDDPM does); "standard"
    # subtracts the training mean and divides by the standard deviation (sklearn StandardScaler)
    numeric_scaling: Literal["quantile", "standard"] = "quantile"
    # how many quantiles "quantile" keeps; None: TabDDPM's max(min(rows // 30, 1000), 10), at most the rows
    quantiles: int | None = Field(default=None, ge=2, le=10_000)
    # extra category inputs derived from each datetime column (month, weekday, hour in its time zone): they
    # help a model learn calendar patterns, and decoding ignores them (the datetime comes from its number)
    datetime_features: list[Literal["month", "weekday", "hour"]] = Field(default_factory=list)

    @field_validator("datetime_features")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each feature at most once, got {value}")
        return value


def load_table_config(values: dict[str, Any] | None = None) -> TableDataConfig:
    """A `TableDataConfig` from a mapping (a YAML `data:` section with overrides applied), or `TableConfigError`."""
    try:
        return TableDataConfig.model_validate(values or {})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = "data." + ".".join(str(p) for p in e["loc"]) if e["loc"] else "data"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = f"unknown key; allowed here: {', '.join(sorted(TableDataConfig.model_fields))}"
            lines.append(f"  {key}: {msg}")
        raise TableConfigError("invalid table configuration:\n" + "\n".join(lines)) from None
