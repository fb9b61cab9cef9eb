"""`sdpipe evaluate` for a table model: its held-out rows (the run's own test split, or `--real FILE`) and its
training rows, read as the run read them, then `tabular.evaluate.evaluate_table_model`; the lines to print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from sdpipe.tabular.commands import LoadedTable


def run_splits(loaded: LoadedTable) -> dict[str, pd.DataFrame]:
    """The training run's rows by split ("train", "validation", "test"), from the validation the model records
    (RUN/model/sdpipe_training.json); a table changed since is refused, as training refuses it."""
    import numpy as np

    from sdpipe.tabular.pipeline import TRAINING_FILE, read_validated
    from sdpipe.tabular.pipeline_config import TablePipelineConfig
    from sdpipe.tabular.preprocess import table_frame

    record = loaded.path / TRAINING_FILE
    if not record.is_file():
        raise ValueError(f"{loaded.path}: no {TRAINING_FILE}, so its training rows are unknown; give --real FILE")
    cfg = TablePipelineConfig.model_validate(json.loads(record.read_text())["config"])
    found = read_validated(cfg)
    splits = np.asarray(found.splits)
    return {name: table_frame(found.table, splits == name) for name in ("train", "validation", "test")}


def evaluate_command(
    loaded: LoadedTable,
    out: Path,
    real: Path | None = None,
    n: int | None = None,
    sets: int = 4,
    target: str | None = None,
    seed: int = 0,
) -> list[str]:
    """Evaluate the table model against `real` (a .csv/.parquet of held-out rows; default: the run's test
    split) and its training rows; writes OUT/metrics.json and OUT/report.html."""
    from sdpipe.tabular.commands import read_rows
    from sdpipe.tabular.evaluate import evaluate_table_model

    splits = run_splits(loaded)
    heldout = read_rows(loaded, real) if real is not None else splits["test"]
    where = str(real) if real is not None else "the run's test split"
    if len(heldout) < 10:
        raise ValueError(f"{where} has {len(heldout)} rows; the evaluation needs at least 10 held-out rows")
    metrics = evaluate_table_model(
        loaded.model, heldout, splits["train"], out=out, sets=sets, n=n, seed=seed, target=target
    )
    return [f"{len(heldout)} held-out rows ({where}), {sets} sets", *summary_lines(metrics), f"figures: {out}"]


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per synthesis figure, then one per imputation method: `name mean (low-high)`."""
    lines = [f"{name}: {_cell(iv)}" for name, iv in metrics["figures"].items()]
    for method, got in metrics.get("imputation", {}).get("methods", {}).items():
        figs = ", ".join(f"{f} {_cell(got[f])}" for f in ("mae", "accuracy", "coverage") if f in got)
        lines.append(f"imputation, {method}: {figs}")
    return lines


def _cell(iv: dict[str, Any]) -> str:
    return f"{iv['mean']:.3g} ({iv['low']:.3g} to {iv['high']:.3g})"
