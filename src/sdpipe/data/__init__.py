"""Data stage: sources -> `sdpipe data validate` (manifest + report) -> `open_split` for training.

`load_dataset`/`check_dataset` give the embedded digits in memory (the demo); `open_split(cfg, split)`
gives any source's split as a streaming `ImageSet`; `check_source_unchanged` refuses data that changed
since it was validated. See docs/data.md.
"""

from sdpipe.data.digits import DataCheck, Dataset, check_dataset, load_dataset, to_model_range, to_source_range
from sdpipe.data.imageset import ImageSet, ensure_validated, open_split
from sdpipe.data.splits import assign_split
from sdpipe.data.versioning import SourceChangedError, check_source_unchanged

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
