"""The embedded sklearn digits set (1797 8x8 grayscale images, values 0..16, 10 classes).

Images are held as `uint8`-valued floats in the source range and scaled to the model's range [-1, 1] only
when training; `to_source_range` undoes that exactly for writing PNGs back in the original intensities.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from sdpipe.config import DataConfig


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # (N, C, H, W) float32 in the source value range
    labels: np.ndarray  # (N,) int64 class indices
    class_names: list[str]
    value_range: tuple[float, float]  # the source's (min, max) intensity
    dataset_id: str  # content hash of images and labels


@dataclass
class DataCheck:
    n_images: int
    image_shape: tuple[int, ...]
    class_counts: dict[str, int]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _content_id(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return "sha256:" + h.hexdigest()[:16]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the source named by `cfg.source` (only the embedded digits for now)."""
    if cfg.source != "digits":  # pragma: no cover - guarded by the config's Literal
        raise ValueError(f"unknown data source {cfg.source!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    names = [str(n) for n in bunch.target_names]
    return Dataset(images, labels, names, (0.0, 16.0), _content_id(images, labels))


def check_dataset(ds: Dataset) -> DataCheck:
    """Report what would make training on `ds` wrong: bad shapes, values, labels or empty classes."""
    n = len(ds.images)
    counts = {name: int((ds.labels == i).sum()) for i, name in enumerate(ds.class_names)}
    check = DataCheck(n, tuple(ds.images.shape[1:]), counts)
    if n == 0:
        check.problems.append("the dataset is empty")
        return check
    if ds.images.ndim != 4:
        check.problems.append(f"images must be (N, C, H, W), got shape {ds.images.shape}")
    if len(ds.labels) != n:
        check.problems.append(f"{n} images but {len(ds.labels)} labels")
    if not np.isfinite(ds.images).all():
        check.problems.append(f"{int((~np.isfinite(ds.images)).sum())} non-finite pixel values")
    lo, hi = ds.value_range
    outside = int(((ds.images < lo) | (ds.images > hi)).sum())
    if outside:
        check.problems.append(f"{outside} pixel values outside the declared range [{lo}, {hi}]")
    bad_labels = int(((ds.labels < 0) | (ds.labels >= len(ds.class_names))).sum())
    if bad_labels:
        check.problems.append(f"{bad_labels} labels outside 0..{len(ds.class_names) - 1}")
    empty = [k for k, v in counts.items() if v == 0]
    if empty:
        check.problems.append(f"classes with no images: {empty}")
    return check


def to_model_range(images: np.ndarray | torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Source intensities -> [-1, 1]."""
    lo, hi = value_range
    x = torch.as_tensor(images, dtype=torch.float32)
    return (x - lo) / (hi - lo) * 2 - 1


def to_source_range(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """[-1, 1] -> source intensities, clamped to the source's range."""
    lo, hi = value_range
    return ((x.clamp(-1, 1) + 1) / 2 * (hi - lo) + lo).clamp(lo, hi)
