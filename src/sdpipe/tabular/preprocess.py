"""A table's pre-processing for a diffusion model, fitted on the training split, saved with the model and
reversible (issue 18, item 2). See docs/tables.md, "Pre-processing".

    pre = fit_preprocessor(table, TablePreprocessConfig(), rows=train_rows)   # a TypedTable, training rows
    encoded = pre.encode(table_frame(table))          # EncodedTable: torch tensors for the model
    frame = pre.decode(model_output)                  # the source's columns, order, dtypes and rules
    pre.save(folder); TablePreprocessor.load(folder)  # JSON + safetensors, no pickle

The encoded layout, in the order of the source's columns (`TablePreprocessor.columns` gives each column's
indices; `numeric_names` and `categorical_names` name every encoded column):

* `EncodedTable.numeric`, float32 (N, Dn): one column per numeric, integer and datetime column (datetimes
  as seconds since 1970), scaled with `numeric_scaling` (quantile: onto a standard normal; standard: zero
  mean, unit variance). A missing cell is 0 after scaling.
* `EncodedTable.categorical`, int64 (N, Dc), with `category_sizes`: for each source column in order,
  a categorical or boolean column's index in its training category set (a missing cell: the extra last
  index, when training had missing cells), or a number's missing indicator (`name:missing`, 2 values:
  0 observed, 1 missing; only when training had missing cells), then a datetime's derived features
  (`name:month`, `name:weekday`, `name:hour`; ignored by decode).
* id, text and empty columns are not encoded. Decoding gives new ids (sdpipe.tabular.columns.new_ids:
  counting on after the largest training id, of the same kind) and all-missing text.
* Masks for imputation: `observed` (N, columns) is True where the source cell held a value;
  `numeric_observed` (N, Dn) is False where a number was missing and filled with 0; `categorical_observed`
  (N, Dc) is False for a category or derived feature of a missing cell (a missing indicator is always
  observed: missingness itself is known).

Missing cells are data, not dropped rows: the model learns the indicators and missing categories, and
decode re-creates a missing cell wherever they say so. Decode accepts any model output: NaN numbers count
as 0, numbers are clipped to the training range and rounded (integers whole, decimals to the training
decimals, datetimes to their resolution), category indices are clipped into the category set.
Encode refuses, naming the column: a column of the fitted table that the frame lacks, a category training
never saw, a cell that is not a number or datetime, an infinite number. A missing cell where training had
none is encoded as 0 (number) or index 0 (category) and marked unobserved.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdpipe.tabular.columns import (
    DERIVED_SIZES,
    ColumnSpec,
    PreprocessError,
    all_missing,
    category_codes,
    datetime_feature,
    decode_category,
    decode_number,
    fit_column,
    new_ids,
    numbers,
)
from sdpipe.tabular.config import TablePreprocessConfig

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from sdpipe.tabular.schema import TypedTable

__all__ = ["EncodedTable", "PreprocessError", "TablePreprocessor", "fit_preprocessor", "table_frame"]

KIND, FORMAT = "sdpipe-table-preprocessor", 1
JSON_FILE, ARRAYS_FILE = "preprocess.json", "preprocess.safetensors"
Z_LIMIT = 1e6  # model output beyond this many standard deviations is taken as this (then clipped to the range)


@dataclass
class EncodedTable:
    """A table as model inputs (layout: module docstring). Built by `TablePreprocessor.encode`, or from a
    model's output with `numeric`, `categorical` and the preprocessor's `category_sizes` alone."""

    numeric: torch.Tensor  # float32 (N, Dn)
    categorical: torch.Tensor  # int64 (N, Dc)
    category_sizes: list[int]  # per categorical column
    observed: torch.Tensor | None = None  # bool (N, source columns): the cell held a value
    numeric_observed: torch.Tensor | None = None  # bool (N, Dn): not a fill-in for a missing number
    categorical_observed: torch.Tensor | None = None  # bool (N, Dc): not a fill-in for a missing cell

    @property
    def rows(self) -> int:
        return int(self.numeric.shape[0])


class TablePreprocessor:
    """The fitted pre-processing of one table: `columns` (one `ColumnSpec` per source column, in order)
    and the scaler's fitted `arrays`. Make one with `fit_preprocessor` or `TablePreprocessor.load`."""

    def __init__(
        self, config: TablePreprocessConfig, columns: list[ColumnSpec], arrays: dict[str, np.ndarray], rows: int
    ) -> None:
        self.config, self.columns, self.arrays, self.rows = config, columns, arrays, rows
        # the scaler is always rebuilt from the arrays, right after fitting as after loading: one code path
        self._scaler = _build_scaler(config.numeric_scaling, arrays) if self.numeric_width else None

    @property
    def names(self) -> list[str]:
        """The source's column names, in order (decode returns these)."""
        return [c.name for c in self.columns]

    @property
    def numeric_names(self) -> list[str]:
        return [c.name for c in sorted((c for c in self.columns if c.numeric is not None), key=_numeric_index)]

    @property
    def numeric_width(self) -> int:
        return sum(c.numeric is not None for c in self.columns)

    @property
    def categorical_names(self) -> list[str]:
        return [name for _, name, _ in self._categorical()]

    @property
    def category_sizes(self) -> list[int]:
        return [size for _, _, size in self._categorical()]

    def _categorical(self) -> list[tuple[int, str, int]]:
        """(index, name, size) of every categorical column, in index order."""
        out = []
        for c in self.columns:
            if c.category is not None:
                assert c.size is not None
                out.append((c.category, c.name, c.size))
            if c.missing is not None:
                out.append((c.missing, f"{c.name}:missing", 2))
            out += [(k, f"{c.name}:{feature}", DERIVED_SIZES[feature]) for feature, k in c.derived.items()]
        return sorted(out)

    def encode(self, frame: pd.DataFrame) -> EncodedTable:
        """A frame with the fitted table's columns (others are ignored) as model inputs; `PreprocessError`
        naming the column for what cannot be encoded (module docstring)."""
        import torch

        absent = [name for name in self.names if name not in frame.columns]
        if absent:
            raise PreprocessError(
                f"the frame has no column {absent[0]!r}" + (f" (nor {absent[1:]})" if absent[1:] else "") + "; "
                f"the preprocessor was fitted on {self.names}"
            )
        n, sizes = len(frame), self.category_sizes
        raw = _number_matrix(self.columns, frame)
        cats = np.zeros((n, len(sizes)), dtype=np.int64)
        cat_observed = np.ones((n, len(sizes)), dtype=bool)
        observed = np.ones((n, len(self.columns)), dtype=bool)
        for j, spec in enumerate(self.columns):
            values = frame[spec.name].reset_index(drop=True)
            missing = values.isna().to_numpy()
            observed[:, j] = ~missing
            if spec.missing is not None:
                cats[:, spec.missing] = missing
            for feature, k in spec.derived.items():
                cats[:, k] = datetime_feature(spec, feature, values, missing)
                cat_observed[missing, k] = False
            if spec.category is not None:
                cats[:, spec.category] = category_codes(spec, values, missing)
                cat_observed[missing, spec.category] = False
        z = self._scaler.transform(raw) if self._scaler is not None and n else raw  # sklearn keeps NaN as NaN
        return EncodedTable(
            numeric=torch.from_numpy(np.nan_to_num(z, nan=0.0).astype(np.float32)),
            categorical=torch.from_numpy(cats),
            category_sizes=sizes,
            observed=torch.from_numpy(observed),
            numeric_observed=torch.from_numpy(~np.isnan(raw)),
            categorical_observed=torch.from_numpy(cat_observed),
        )

    def decode(self, encoded: EncodedTable, id_start: int = 0) -> pd.DataFrame:
        """Model output as rows of the source table: its column names, order and dtypes, every value within
        the training range and category set (module docstring). New ids are numbered from `id_start`: pass
        the count of rows decoded before to keep ids unique across batches."""
        import pandas as pd

        z, codes = self._checked(encoded)
        z = np.clip(np.nan_to_num(z, nan=0.0, posinf=Z_LIMIT, neginf=-Z_LIMIT), -Z_LIMIT, Z_LIMIT)
        x = self._scaler.inverse_transform(z) if self._scaler is not None and len(z) else z
        sizes = np.asarray(self.category_sizes, dtype=np.int64)
        codes = np.clip(codes, 0, np.maximum(sizes - 1, 0))
        n, out = len(z), {}
        for spec in self.columns:
            if spec.numeric is not None:
                missing = codes[:, spec.missing] == 1 if spec.missing is not None else np.zeros(n, dtype=bool)
                out[spec.name] = decode_number(spec, x[:, spec.numeric], missing)
            elif spec.category is not None:
                out[spec.name] = decode_category(spec, codes[:, spec.category])
            elif spec.role == "id":
                out[spec.name] = new_ids(spec, n, id_start)
            else:
                out[spec.name] = all_missing(spec, n)
        return pd.DataFrame(out, columns=self.names)

    def _checked(self, encoded: EncodedTable) -> tuple[np.ndarray, np.ndarray]:
        """The model output as float64 numbers and int64 category indices, after checking its shapes."""
        import torch

        numeric, categorical = encoded.numeric, encoded.categorical
        n, dn, dc = int(numeric.shape[0]), self.numeric_width, len(self.category_sizes)
        if numeric.ndim != 2 or numeric.shape[1] != dn:
            raise PreprocessError(f"numeric has shape {tuple(numeric.shape)}; this table needs ({n}, {dn})")
        if categorical.ndim != 2 or tuple(categorical.shape) != (n, dc):
            raise PreprocessError(f"categorical has shape {tuple(categorical.shape)}; this table needs ({n}, {dc})")
        if list(encoded.category_sizes) != self.category_sizes:
            raise PreprocessError(
                f"category_sizes {list(encoded.category_sizes)} differ from this table's {self.category_sizes}"
            )
        cats = categorical.detach().cpu()
        if cats.is_floating_point():  # e.g. a sampler's float indices: NaN counts as 0
            cats = torch.nan_to_num(cats, nan=0.0).clamp(-(2.0**62), 2.0**62).round()
        return numeric.detach().cpu().double().numpy(), cats.to(torch.int64).numpy()

    def save(self, folder: str | Path) -> Path:
        """Record the fitted preprocessor in `folder` (preprocess.json, plus preprocess.safetensors for the
        scaler's arrays); returns the JSON's path. No pickle: `load` rebuilds it from these alone."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.arrays:
            save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, str(folder / ARRAYS_FILE))
        else:
            (folder / ARRAYS_FILE).unlink(missing_ok=True)
        doc = {
            "kind": KIND,
            "format": FORMAT,
            "config": self.config.model_dump(mode="json"),
            "rows": self.rows,
            "arrays": sorted(self.arrays),
            "columns": [c.to_json() for c in self.columns],
        }
        path, writing = folder / JSON_FILE, folder / (JSON_FILE + ".writing")
        writing.write_text(json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
        os.replace(writing, path)  # complete or absent
        return path

    @classmethod
    def load(cls, folder: str | Path) -> TablePreprocessor:
        """The preprocessor `save` recorded in `folder`."""
        folder = Path(folder)
        path = folder / JSON_FILE
        if not path.is_file():
            raise PreprocessError(f"{folder}: no {JSON_FILE}; save a fitted preprocessor there first")
        doc = json.loads(path.read_text())
        if doc.get("kind") != KIND or doc.get("format") != FORMAT:
            raise PreprocessError(f"{path}: not a table preprocessor of format {FORMAT} (kind {doc.get('kind')!r})")
        arrays: dict[str, np.ndarray] = {}
        if doc["arrays"]:
            from safetensors.numpy import load_file

            if not (folder / ARRAYS_FILE).is_file():
                raise PreprocessError(f"{folder}: {JSON_FILE} needs {ARRAYS_FILE} beside it, which is missing")
            arrays = load_file(str(folder / ARRAYS_FILE))
            if sorted(arrays) != doc["arrays"]:
                raise PreprocessError(f"{folder / ARRAYS_FILE}: holds {sorted(arrays)}, expected {doc['arrays']}")
        columns = [ColumnSpec.from_json(c) for c in doc["columns"]]
        return cls(TablePreprocessConfig.model_validate(doc["config"]), columns, arrays, int(doc["rows"]))


def _numeric_index(c: ColumnSpec) -> int:
    assert c.numeric is not None
    return c.numeric


def table_frame(table: TypedTable, rows: Sequence[int] | np.ndarray | None = None) -> pd.DataFrame:
    """A typed table's values as a frame (its column order), optionally only `rows` (positions, or a
    boolean mask such as `split == "train"`), renumbered from 0."""
    import pandas as pd

    frame = pd.DataFrame({c.name: table.values[c.name].reset_index(drop=True) for c in table.columns})
    if rows is None:
        return frame
    picked = np.asarray(rows)
    if picked.dtype == bool:
        picked = np.flatnonzero(picked)
    return frame.iloc[picked].reset_index(drop=True)


def fit_preprocessor(
    table: TypedTable,
    cfg: TablePreprocessConfig | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
) -> TablePreprocessor:
    """Fit the pre-processing on the training rows of `table` (`rows`: positions or a boolean mask; None:
    all of them, for a table that is the training split already). Nothing from other rows is used."""
    cfg = cfg or TablePreprocessConfig()
    frame = table_frame(table, rows)
    if len(frame) == 0:
        raise PreprocessError("no training rows to fit the preprocessor on")
    specs, n_numeric, n_categorical = [], 0, 0
    for c in table.columns:
        spec = fit_column(c.name, c.type, frame[c.name], cfg.datetime_features)
        if spec.role == "number":
            spec.numeric, n_numeric = n_numeric, n_numeric + 1
            if spec.has_missing:
                spec.missing, n_categorical = n_categorical, n_categorical + 1
            for feature in spec.derived:
                spec.derived[feature], n_categorical = n_categorical, n_categorical + 1
        elif spec.role == "category":
            spec.category, n_categorical = n_categorical, n_categorical + 1
        specs.append(spec)
    arrays = _fit_scaler(cfg, _number_matrix(specs, frame)) if n_numeric else {}
    return TablePreprocessor(cfg, specs, arrays, len(frame))


def _number_matrix(specs: list[ColumnSpec], frame: pd.DataFrame) -> np.ndarray:
    """The number columns unscaled, float64 (N, Dn), NaN where missing."""
    out = np.full((len(frame), sum(c.numeric is not None for c in specs)), np.nan)
    for spec in specs:
        if spec.numeric is not None:
            values = frame[spec.name].reset_index(drop=True)
            out[:, spec.numeric] = numbers(spec, values, values.isna().to_numpy())
    return out


def _fit_scaler(cfg: TablePreprocessConfig, x: np.ndarray) -> dict[str, np.ndarray]:
    """Fit sklearn's scaler on the training numbers (NaN = missing: ignored) and keep its fitted arrays."""
    from sklearn.preprocessing import QuantileTransformer, StandardScaler

    if cfg.numeric_scaling == "standard":
        s = StandardScaler().fit(x)
        return {"mean": s.mean_, "scale": s.scale_, "var": s.var_}
    n = len(x)
    q = max(2, min(cfg.quantiles or max(min(n // 30, 1000), 10), n))
    t = QuantileTransformer(n_quantiles=q, output_distribution="normal", subsample=max(10_000, q), random_state=0)
    with warnings.catch_warnings():  # n_quantiles > rows (only with 1 row): sklearn lowers it and says so
        warnings.simplefilter("ignore", UserWarning)
        t.fit(x)
    return {"quantiles": t.quantiles_, "references": t.references_}


def _build_scaler(kind: str, arrays: dict[str, np.ndarray]) -> Any:
    """sklearn's fitted scaler, rebuilt from its fitted arrays.

    Why rebuild rather than pickle: a pickle runs code when loaded and ties a saved model to one sklearn
    version's private layout. Why not np.interp by hand: sklearn's transform also averages the two
    interpolation directions over tied quantiles, clips at its bounds and keeps NaN; rebuilding keeps that
    code. Only the documented fitted attributes are set (quantiles_, references_, n_quantiles_; mean_,
    scale_, var_; n_features_in_)."""
    from sklearn.preprocessing import QuantileTransformer, StandardScaler

    scaler: Any
    if kind == "quantile":
        quantiles = np.asarray(arrays["quantiles"], dtype=np.float64)
        scaler = QuantileTransformer(n_quantiles=quantiles.shape[0], output_distribution="normal")
        scaler.quantiles_, scaler.n_quantiles_ = quantiles, quantiles.shape[0]
        scaler.references_ = np.asarray(arrays["references"], dtype=np.float64)
        width = quantiles.shape[1]
    else:
        scaler = StandardScaler()
        scaler.mean_ = np.asarray(arrays["mean"], dtype=np.float64)
        scaler.scale_ = np.asarray(arrays["scale"], dtype=np.float64)
        scaler.var_ = np.asarray(arrays["var"], dtype=np.float64)
        width = scaler.mean_.shape[0]
    scaler.n_features_in_ = width
    return scaler
