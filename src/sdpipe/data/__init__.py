"""Data stage: load a source into tensors and check it before any training starts."""

from sdpipe.data.digits import DataCheck, Dataset, check_dataset, load_dataset, to_model_range, to_source_range

__all__ = ["Dataset", "DataCheck", "check_dataset", "load_dataset", "to_model_range", "to_source_range"]
