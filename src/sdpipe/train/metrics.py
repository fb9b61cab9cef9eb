"""RUN/metrics.jsonl: one JSON row per optimizer step, and event rows, appended as training goes.

A step row has `step`, `loss` (the objective the optimizer minimizes), `denoising_loss` (the plain denoising
loss, without the learned uncertainty weighting), `lr`, `grad_norm`, `samples_per_s` and `elapsed_s`; an
event row has `step` and `event` (`nonfinite_step_skipped`, `rollback`, `validation`, `evaluation`).

Which rows count: a rollback row, `{"event": "rollback", "to_step": S, ...}`, supersedes every row above it
whose step is greater than S, except the `nonfinite_step_skipped` and `rollback` events (the record of
what happened): those steps were trained again after it, and their new rows follow it. `read_metrics`
applies that rule; every reader of the history goes through it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO

RECORD_EVENTS = ("nonfinite_step_skipped", "rollback")  # never superseded


def _superseded(row: dict, to_step: int) -> bool:
    return row["step"] > to_step and row.get("event") not in RECORD_EVENTS


def counted_rows(rows: Iterable[dict]) -> list[dict]:
    """The rows that count, in file order: without those a later rollback row supersedes."""
    kept: list[dict] = []
    for row in rows:
        if row.get("event") == "rollback":
            kept = [r for r in kept if not _superseded(r, row["to_step"])]
        kept.append(row)
    return kept


def rows_up_to(rows: Iterable[dict], step: int) -> list[dict]:
    """The rows a run resumed from the checkpoint of `step` keeps: those of steps up to it, and the skipped
    steps that led to a rollback to it (or before); the rows of the steps lost after it go."""
    kept: list[dict] = []
    pending: list[dict] = []  # skipped steps past `step`: kept if a rollback follows them
    for row in rows:
        if row["step"] > step:
            if row.get("event") == "nonfinite_step_skipped":
                pending.append(row)
            continue
        if row.get("event") == "rollback":
            kept, pending = kept + pending, []
        kept.append(row)
    return kept


def _parsed(lines: list[str]) -> list[dict]:
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line, half written when the run was killed
                break
            raise ValueError(f"metrics.jsonl line {i + 1} is not JSON: {line[:80]!r}") from None
    return rows


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl that count (see the module's doc), in file order; [] without the file."""
    path = Path(path)
    if not path.is_file():
        return []
    return counted_rows(_parsed([line for line in path.read_text().splitlines() if line.strip()]))


def step_rows(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if "event" not in r]


def event_rows(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if "event" in r]


class MetricsLog:
    """The rows of a run in progress: written to its metrics.jsonl as they come, and kept as they count."""

    def __init__(self, file: IO[str], rows: list[dict]) -> None:
        self.file, self.rows = file, list(rows)
        file.writelines(json.dumps(r) + "\n" for r in self.rows)

    def add(self, row: dict, flush: bool = False) -> None:
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        if flush:
            self.file.flush()

    def roll_back(self, event: dict) -> None:
        """Log a rollback row (flushed: resuming reads it back) and drop the rows it supersedes."""
        self.add(event, flush=True)
        self.rows = counted_rows(self.rows)

    @property
    def history(self) -> list[dict]:
        return step_rows(self.rows)

    @property
    def events(self) -> list[dict]:
        return event_rows(self.rows)
