"""`sdpipe train` for table configs (`data.source: table`): the validated table -> its splits -> the
preprocessor fitted on the training rows -> `train_table_model` (the shared trainer) -> RUN/model.

    cfg = load_table_pipeline_config("examples/table.yaml", ["data.path=t.csv", "data.validated_dir=v"])
    trained = train_table(cfg, "runs/t1")        # trained.model.path == runs/t1/model

The table is read from `data.path` (or `data.db_url` + `data.sql`) again and checked row by row against the
validation's manifest (`sdpipe data validate TABLE --out DIR`, DIR = `data.validated_dir`): a changed table
is refused (`--revalidate` validates it again first); a `validated_dir` without a validation is validated
first. Rows take the manifest's split; the test split is never read for training. RUN/table_config.yaml is
the run's full config (`--resume` continues with it); RUN/model/sdpipe_training.json records the config,
the dataset id and the split sizes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpipe.progress import progress_bar
from sdpipe.tabular.pipeline_config import TablePipelineConfig, write_table_config

if TYPE_CHECKING:
    from sdpipe.tabular.schema import TypedTable
    from sdpipe.tabular.train import TableTrainResult

TRAINING_FILE = "sdpipe_training.json"


@dataclass
class ValidatedTable:
    """A validated table read again: typed rows, each row's split, the dataset id."""

    table: TypedTable
    splits: list[str]
    dataset_id: str


@dataclass
class TrainedTable:
    result: TableTrainResult
    model: Any  # has .path: RUN/model (what `sdpipe train` prints)
    rows: dict[str, int]
    seconds: dict[str, float]


def absolute_data_paths(cfg: TablePipelineConfig) -> TablePipelineConfig:
    """`cfg` with data.path, data.validated_dir and data.heldout_path absolute (the saved config names the
    data wherever a resume runs from)."""
    keys = ("path", "validated_dir", "heldout_path")
    update = {k: str(Path(v).resolve()) for k in keys if (v := getattr(cfg.data, k))}
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=update)}) if update else cfg


def read_validated(cfg: TablePipelineConfig, revalidate: bool = False, show_progress: bool = False) -> ValidatedTable:
    """The table of `cfg.data`, validated into `data.validated_dir` first when that holds no validation yet
    (or with `revalidate`), read again and checked against the manifest (`ValueError` when it changed)."""
    import pyarrow.parquet as pq

    from sdpipe.tabular.hashing import exact_hashes
    from sdpipe.tabular.schema import infer_schema
    from sdpipe.tabular.sources import load_table
    from sdpipe.tabular.validate import MANIFEST, REPORT, SCHEMA, validate_table

    data = cfg.data
    if not data.validated_dir:
        raise ValueError("a table run needs data.validated_dir: the folder `sdpipe data validate` writes (or will)")
    if data.path is None and data.db_url is None:
        raise ValueError("a table run needs data.path (a .csv/.parquet file or folder) or data.db_url + data.sql")
    out = Path(data.validated_dir)
    if revalidate or not (out / REPORT).is_file():
        validate_table(data, out, show_progress=show_progress)
    report = json.loads((out / REPORT).read_text())
    redo = "validate it again: sdpipe train ... --revalidate (or sdpipe data validate TABLE --out DIR)"
    if report.get("kind") != "table":
        raise ValueError(f"data.validated_dir {out} holds a validation of images, not of a table")
    given = data.path if data.path is not None else data.shown_source
    recorded = (report.get("config") or {}).get("path") or report.get("source")
    if data.path is not None and recorded and Path(recorded).resolve() != Path(data.path).resolve():
        raise ValueError(f"data.validated_dir {out} holds a validation of {recorded}, not of data.path {given}; {redo}")
    schema = json.loads((out / SCHEMA).read_text())
    manifest = pq.read_table(out / MANIFEST, columns=["row_sha256", "split"]).to_pydict()
    raw = load_table(data)
    if data.split_column is not None and data.split_column in raw.frame.columns:
        raw.frame = raw.frame.drop(columns=[data.split_column])
    types = {c["name"]: c["type"] for c in schema["columns"]}
    if sorted(map(str, raw.frame.columns)) != sorted(types):
        raise ValueError(
            f"{given}: its columns {list(raw.frame.columns)} are not the validated ones {list(types)}; {redo}"
        )
    table = infer_schema(raw, data, forced=types)
    hashes = exact_hashes(table)
    if hashes != manifest["row_sha256"]:
        changed = next(
            (i + 1 for i, (a, b) in enumerate(zip(hashes, manifest["row_sha256"], strict=False)) if a != b), None
        )
        what = f"row {changed} differs" if changed else f"{len(hashes)} rows, validated {len(manifest['row_sha256'])}"
        raise ValueError(f"{given} changed since it was validated into {out} ({what}); {redo}")
    return ValidatedTable(table, list(manifest["split"]), str(schema["dataset_id"]))


def train_table(
    cfg: TablePipelineConfig,
    run_dir: str | Path,
    resume: bool = False,
    show_progress: bool = True,
    revalidate: bool = False,
) -> TrainedTable:
    """Train a table model as `cfg` says into `run_dir` (module docstring); `resume` continues its run from
    the last checkpoint. Returns the result, with `.model.path` = RUN/model."""
    import numpy as np

    from sdpipe.tabular.preprocess import fit_preprocessor, table_frame
    from sdpipe.tabular.train import train_table_model

    run_dir = Path(run_dir)
    cfg = absolute_data_paths(cfg)
    t0 = time.perf_counter()
    found = read_validated(cfg, revalidate, show_progress)
    splits = np.asarray(found.splits)
    rows = {name: int((splits == name).sum()) for name in ("train", "validation", "test")}
    if rows["train"] == 0:
        raise ValueError(f"{cfg.data.validated_dir}: no rows in the train split; nothing to train on")
    pre = fit_preprocessor(found.table, cfg.preprocess, rows=splits == "train")
    train_rows = pre.encode(table_frame(found.table, splits == "train"))
    validating = cfg.train.validate_every is not None and rows["validation"] > 0
    val_rows = pre.encode(table_frame(found.table, splits == "validation")) if validating else None
    seconds = {"data": time.perf_counter() - t0}
    write_table_config(run_dir, cfg)
    t = time.perf_counter()
    with progress_bar("training", cfg.train.steps, show_progress) as advance:
        result = train_table_model(
            train_rows,
            val_rows,
            pre,
            cfg.model,
            cfg.train,
            run_dir,
            resume=resume,
            progress=lambda step, row: advance(1, _progress_text(row)),
        )
    seconds["train"] = time.perf_counter() - t
    record = {
        "kind": "table",
        "config": cfg.model_dump(mode="json"),
        "dataset_id": found.dataset_id,
        "rows": rows,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    (result.path / TRAINING_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return TrainedTable(result, _ModelDir(result.path), rows, seconds)


@dataclass(frozen=True)
class _ModelDir:
    path: Path


def _progress_text(row: dict) -> str:
    loss = row.get("denoising_loss", row.get("loss", float("nan")))
    return f"loss {loss:.4f}  {row.get('samples_per_s', 0):.0f} rows/s"
