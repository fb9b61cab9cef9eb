"""Tables: sources (CSV, Parquet, SQL) -> `sdpipe data validate TABLE` (schema, checks, splits, manifest,
report). See docs/tables.md.

`validate_table(cfg, out)` validates the table a `TableDataConfig` names; `load_table` reads one untyped;
`infer_schema` types it; `fit_preprocessor` fits the model's reversible pre-processing on the training rows
(`TablePreprocessor.encode` / `decode` / `save` / `load`). Names are imported on first use, so importing the
package costs nothing (pandas is loaded only when a table is read; torch and scikit-learn only when one is
encoded).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdpipe.tabular.config import TableConfigError, TableDataConfig, TablePreprocessConfig, load_table_config
    from sdpipe.tabular.generate import Imputation, generate_rows, impute
    from sdpipe.tabular.model_config import TableModelConfig
    from sdpipe.tabular.preprocess import (
        EncodedTable,
        PreprocessError,
        TablePreprocessor,
        fit_preprocessor,
        table_frame,
    )
    from sdpipe.tabular.schema import TypedTable, infer_schema
    from sdpipe.tabular.sources import RawTable, TableError, is_table_source, load_table
    from sdpipe.tabular.train import TableModel, load_table_model, save_table_model, train_table_model
    from sdpipe.tabular.validate import validate_table

_HOME = {
    **dict.fromkeys(["TableConfigError", "TableDataConfig", "TablePreprocessConfig", "load_table_config"], "config"),
    **dict.fromkeys(
        ["EncodedTable", "PreprocessError", "TablePreprocessor", "fit_preprocessor", "table_frame"], "preprocess"
    ),
    **dict.fromkeys(["TypedTable", "infer_schema"], "schema"),
    **dict.fromkeys(["RawTable", "TableError", "is_table_source", "load_table"], "sources"),
    "validate_table": "validate",
    "TableModelConfig": "model_config",
    **dict.fromkeys(["TableModel", "load_table_model", "save_table_model", "train_table_model"], "train"),
    **dict.fromkeys(["Imputation", "generate_rows", "impute"], "generate"),
}

__all__ = [
    "Imputation",
    "TableModel",
    "TableModelConfig",
    "generate_rows",
    "impute",
    "load_table_model",
    "save_table_model",
    "train_table_model",
    "EncodedTable",
    "PreprocessError",
    "RawTable",
    "TableConfigError",
    "TableDataConfig",
    "TableError",
    "TablePreprocessConfig",
    "TablePreprocessor",
    "TypedTable",
    "fit_preprocessor",
    "infer_schema",
    "is_table_source",
    "load_table",
    "load_table_config",
    "table_frame",
    "validate_table",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'sdpipe.tabular' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sdpipe.tabular.{_HOME[name]}"), name)
