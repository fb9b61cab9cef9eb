"""`sdpipe data validate TABLE` (or `--db URL --sql QUERY`): read a table once, type it, check it, split it,
and write what can be trusted. The source is only ever read.

DIR/manifest.parquet: one row per table row: `row` (1-based), `file` and `line` (where it is; null for
SQL), `row_sha256`, `content_sha256` (sdpipe.tabular.hashing), `split`, `duplicate_of` (the first row with
the same values), `near_duplicate_of` (the first row equal after normalisation, when not exactly equal),
`leak` (e.g. `train row 3`, `heldout row 5`). DIR/schema.json: the columns, their types and the dataset id.
DIR/report.json and DIR/report.html: every check (sdpipe.tabular.checks). DIR/source_files.parquet: the
source's files with size and time, so a later change is caught (sdpipe.data.versioning). report.json is
written last: without it the folder is not a validated table.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdpipe.tabular import checks
from sdpipe.tabular.config import TableDataConfig
from sdpipe.tabular.hashing import content_hashes, dataset_id, exact_hashes, split_of
from sdpipe.tabular.schema import TypedTable, infer_schema
from sdpipe.tabular.sources import RawTable, TableError, load_table

MANIFEST, SCHEMA, REPORT = "manifest.parquet", "schema.json", "report.json"
SPLIT_NAMES = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("validation", "valid", "val", "dev"), "validation"),
    **dict.fromkeys(("test", "heldout", "held-out", "holdout"), "test"),
}


def validate_table(cfg: TableDataConfig, out: str | Path, show_progress: bool = False) -> dict[str, Any]:
    """Validate the table `cfg` names into `out` (manifest.parquet, schema.json, report.json, report.html,
    source_files.parquet) and return the report; `TableError` for a table that cannot be validated."""
    start = time.perf_counter()
    out = Path(out)
    _check_out_dir(cfg, out)
    (out / REPORT).unlink(missing_ok=True)  # a failed run leaves no report: the folder is not trusted
    with _stages(show_progress) as stage:
        stage("reading")
        raw = load_table(cfg)
        if len(raw.frame) == 0:
            raise TableError(f"{raw.source}: the table has no rows; nothing to validate")
        given = _given_splits(raw, cfg.split_column)
        stage("inferring types")
        table = infer_schema(raw, cfg)
        stage("hashing and checking")
        exact = exact_hashes(table)
        content = content_hashes(table, cfg.near_digits)
        splits = given or [split_of(c, cfg.validation_fraction, cfg.test_fraction, cfg.split_salt) for c in content]
        report = _checks(cfg, raw, table, exact, content, splits)
        if cfg.heldout_path:
            stage("checking the held-out table")
            report["heldout"] = _heldout(cfg, table, content, splits)
        stage("writing")
        report["dataset_id"] = dataset_id(table, exact, splits)
        out.mkdir(parents=True, exist_ok=True)
        _write_manifest(out / MANIFEST, raw, exact, content, splits, report)
        _write_schema(out / SCHEMA, raw, table, report)
        if raw.format != "sql":
            from sdpipe.data.versioning import write_source_files

            write_source_files("table", raw.source, out)
    report["config"] = cfg.model_dump(mode="json") | {"db_url": cfg.shown_source if cfg.db_url else None}
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["rows_per_s"] = round(len(raw.frame) / max(report["seconds"], 1e-9), 1)
    from sdpipe.tabular.report import write_report

    write_report(report, out)
    return report


def _check_out_dir(cfg: TableDataConfig, out: Path) -> None:
    if cfg.path is None:
        return
    src, dst = Path(cfg.path).resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise TableError(f"--out {out} is inside the source {cfg.path}: choose a folder outside it")


def _given_splits(raw: RawTable, column: str | None) -> list[str] | None:
    """The splits a `data.split_column` gives (the column is then taken out of the table), or None."""
    if column is None:
        return None
    if column not in raw.frame.columns:
        raise TableError(f"{raw.source}: no column {column!r} (data.split_column); columns: {list(raw.frame.columns)}")
    splits = []
    for i, v in enumerate(raw.frame[column]):
        name = SPLIT_NAMES.get(str(v).strip().lower()) if v is not None else None
        if name is None:
            raise TableError(
                f"{raw.source}: {raw.where(i)} has {v!r} in the split column {column!r}; use train, validation or test"
            )
        splits.append(name)
    raw.frame = raw.frame.drop(columns=[column])
    if raw.frame.shape[1] == 0:
        raise TableError(f"{raw.source}: no columns besides the split column {column!r}")
    return splits


def _checks(
    cfg: TableDataConfig, raw: RawTable, table: TypedTable, exact: list[str], content: list[str], splits: list[str]
) -> dict[str, Any]:
    """Every check of `sdpipe.tabular.checks` on the table, as the report's sections."""
    row = lambda i: i + 1  # noqa: E731 - the report counts rows from 1, like the error messages
    columns: list[dict[str, Any]] = []
    pii: list[dict[str, Any]] = []
    for c in table.columns:
        values, missing = table.values[c.name], table.missing[c.name]
        entry: dict[str, Any] = {"name": c.name, "type": c.type, "reason": c.reason, "storage": c.storage}
        entry |= checks.profile(c.type, values, missing)
        if c.type in ("numeric", "integer"):
            entry["outliers"] = checks.outliers(values, missing, cfg.outlier_k, row)
        if c.type in checks.TEXT_TYPES:
            entry["personal_data"] = checks.personal_data(values, missing, row)
            pii += [{"column": c.name} | p for p in entry["personal_data"]]
        columns.append(entry)
    dups = checks.duplicate_groups(exact)
    near = checks.near_duplicate_groups(content, exact)
    leaks = checks.split_leaks(content, splits, row)
    return {
        "kind": "table",
        "format": raw.format,
        "source": raw.source,
        "query": cfg.sql,
        "files": raw.files[: checks.LISTED],
        "rows": len(raw.frame),
        "columns": len(table.columns),
        "missing_cells": int(sum(int(m.sum()) for m in table.missing.values())),
        "schema": columns,
        "constant_columns": [c["name"] for c in columns if c["constant"]],
        "outlier_columns": {c["name"]: c["outliers"]["count"] for c in columns if c.get("outliers", {}).get("count")},
        "personal_data": pii,
        "duplicate_rows": sum(len(g) - 1 for g in dups),
        "duplicate_groups": [[i + 1 for i in g] for g in dups[: checks.LISTED]],
        "near_duplicate_rows": sum(len(g) - 1 for g in near),
        "near_duplicate_groups": [[i + 1 for i in g] for g in near[: checks.LISTED]],
        "near_digits": cfg.near_digits,
        "leaks": leaks[: checks.LISTED],
        "leak_count": len(leaks),
        "heldout": None,
        "split_column": cfg.split_column,
        "split_counts": dict(sorted(Counter(splits).items(), key=lambda kv: checks.SPLIT_ORDER.get(kv[0], 3))),
        "validation_fraction": None if cfg.split_column else cfg.validation_fraction,
        "test_fraction": None if cfg.split_column else cfg.test_fraction,
    }


def _heldout(cfg: TableDataConfig, table: TypedTable, content: list[str], splits: list[str]) -> dict[str, Any]:
    """Read the held-out table with the table's column types and find its rows that the table holds too."""
    assert cfg.heldout_path is not None
    other = load_table(cfg, cfg.heldout_path)
    names = [c.name for c in table.columns]
    if sorted(map(str, other.frame.columns)) != sorted(names):
        raise TableError(
            f"{other.source}: the held-out table's columns {list(other.frame.columns)} differ from the table's "
            f"{names}; give a table with the same columns"
        )
    other.frame = other.frame[names]
    typed = infer_schema(other, cfg, forced={c.name: c.type for c in table.columns})
    held = content_hashes(typed, cfg.near_digits)
    leaks = checks.heldout_leaks(held, content, splits, lambda i: i + 1, lambda i: i + 1)
    return {"source": other.source, "rows": len(other.frame), "leak_count": len(leaks), "leaks": leaks[: checks.LISTED]}


def _write_manifest(
    path: Path, raw: RawTable, exact: list[str], content: list[str], splits: list[str], report: dict[str, Any]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(exact)
    first_exact: dict[str, int] = {}
    first_content: dict[str, int] = {}
    duplicate_of: list[int | None] = []
    near_of: list[int | None] = []
    for i in range(n):
        j = first_exact.setdefault(exact[i], i)
        k = first_content.setdefault(content[i], i)
        duplicate_of.append(j + 1 if j != i else None)
        near_of.append(k + 1 if k != i and exact[k] != exact[i] else None)
    leak: list[str | None] = [None] * n
    for entry in report["leaks"]:
        leak[entry["row"] - 1] = f"{entry['same_as_split']} row {entry['same_as']}"
    for entry in (report["heldout"] or {}).get("leaks", []):
        leak[entry["row"] - 1] = leak[entry["row"] - 1] or f"heldout row {entry['heldout_row']}"
    files = [raw.files[raw.file_index(i)] if raw.files else None for i in range(n)]
    columns = {
        "row": pa.array(range(1, n + 1), pa.int64()),
        "file": pa.array(files, pa.string()),
        "line": pa.array(raw.line_of_row, pa.int64()) if raw.line_of_row is not None else pa.nulls(n, pa.int64()),
        "row_sha256": pa.array(exact, pa.string()),
        "content_sha256": pa.array(content, pa.string()),
        "split": pa.array(splits, pa.string()),
        "duplicate_of": pa.array(duplicate_of, pa.int64()),
        "near_duplicate_of": pa.array(near_of, pa.int64()),
        "leak": pa.array(leak, pa.string()),
    }
    writing = path.with_name(path.name + ".writing")  # renamed when complete: never a half manifest
    pq.write_table(pa.table(columns), writing)
    os.replace(writing, path)


def _write_schema(path: Path, raw: RawTable, table: TypedTable, report: dict[str, Any]) -> None:
    schema = {
        "dataset_id": report["dataset_id"],
        "format": raw.format,
        "source": raw.source,
        "query": report["query"],
        "rows": table.rows,
        "split_column": report["split_column"],
        "split_counts": report["split_counts"],
        "columns": [{"name": c.name, "type": c.type, "storage": c.storage} for c in table.columns],
    }
    path.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def _stages(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A spinner naming the current stage (tables are read whole, so there is no count to show)."""
    if not enabled:
        yield lambda _: None
        return
    from sdpipe.progress import console

    with console.status("validating table") as status:
        yield lambda what: status.update(f"validating table: {what}")
