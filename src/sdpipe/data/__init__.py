"""Data stage: sources -> `sdpipe data validate` (manifest + report) -> `open_split` for training.

`load_dataset`/`check_dataset` give the embedded digits in memory (the demo); `open_split(cfg, split)`
gives any source's split as a streaming `ImageSet`; `check_source_unchanged` refuses data that changed
since it was validated. See docs/data.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdpipe.data.digits import DataCheck, Dataset, check_dataset, load_dataset, to_model_range, to_source_range
    from sdpipe.data.imageset import ImageSet, ensure_validated, open_split
    from sdpipe.data.splits import assign_split
    from sdpipe.data.versioning import SourceChangedError, check_source_unchanged

# name -> module; imported on first use, so `sdpipe data --help` (and every sdpipe command's start) does not
# import torch just to register the data commands
_HOME = {
    **dict.fromkeys(
        ["DataCheck", "Dataset", "check_dataset", "load_dataset", "to_model_range", "to_source_range"], "digits"
    ),
    **dict.fromkeys(["ImageSet", "ensure_validated", "open_split"], "imageset"),
    "assign_split": "splits",
    **dict.fromkeys(["SourceChangedError", "check_source_unchanged"], "versioning"),
}

__all__ = [
    "Dataset",
    "DataCheck",
    "ImageSet",
    "SourceChangedError",
    "assign_split",
    "check_dataset",
    "check_source_unchanged",
    "ensure_validated",
    "load_dataset",
    "open_split",
    "to_model_range",
    "to_source_range",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'sdpipe.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sdpipe.data.{_HOME[name]}"), name)
