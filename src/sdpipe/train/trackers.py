"""Experiment trackers through accelerate: TensorBoard and MLflow (file store), besides metrics.jsonl.

TensorBoard writes RUN/logs/sdpipe/; MLflow writes to RUN/mlruns unless MLFLOW_TRACKING_URI names another
store (a tracking server, a database), so nothing leaves the run folder unless the user says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator

PROJECT = "sdpipe"


def accelerator_tracking(trackers: Sequence[str], run_dir: Path) -> dict[str, Any]:
    """Keyword arguments for `Accelerator` that turn on `trackers` for a run in `run_dir`."""
    if not trackers:
        return {}
    if "mlflow" in trackers and "MLFLOW_TRACKING_URI" not in os.environ:
        import mlflow

        # MLflow 3 keeps the plain-file store in "maintenance mode" behind this switch; it is still the one
        # store that needs no server or database, which is what a run folder should hold
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
    return {"log_with": list(trackers), "project_dir": str(run_dir / "logs")}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.steps": 1500, ...}; lists become strings (trackers take scalars only)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def start_trackers(accelerator: Accelerator, config: dict[str, Any]) -> None:
    """Open the run in every tracker the accelerator was given, recording the whole config."""
    if accelerator.log_with:
        accelerator.init_trackers(PROJECT, config=_flat(config))


def finish_trackers(accelerator: Accelerator) -> None:
    """Close the trackers. (Not `accelerator.end_training()`: that also ends the process group, which the
    pipeline still needs to save the model from rank 0 and wait for it.)"""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            tracker.finish()
