"""Preprocessing from the config: channels, resize (chosen filter), center/random crop, horizontal flip.

`Preprocess` is recorded in the model's metadata (`as_dict`) so generation knows what the model saw. Random
choices (crop offset, flip) come from a per-sample `torch.Generator`, seeded from the training generator,
so a resumed run draws exactly the same crops and flips, whatever the number of decode threads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class Preprocess:
    channels: int  # 1 (grayscale) or 3 (RGB)
    resolution: int | None = None  # shorter side resized to this, then cropped to a square; None = as stored
    resize_filter: str = "bicubic"
    crop: str = "center"  # or "random"
    random_flip: bool = False

    @property
    def is_random(self) -> bool:
        return self.random_flip or (self.crop == "random" and self.resolution is not None)

    def as_dict(self) -> dict:
        return asdict(self)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return (self.resolution, self.resolution) if self.resolution else (height, width)

    def __call__(self, pixels: np.ndarray, gen: torch.Generator | None) -> np.ndarray:
        """uint8 (H, W) or (H, W, 3) -> uint8 (C, H', W'); `gen` is needed only when `is_random`."""
        im = Image.fromarray(pixels)
        im = im.convert("L" if self.channels == 1 else "RGB")
        if self.resolution is not None:
            im = self._resize_and_crop(im, gen)
        out = np.asarray(im, dtype=np.uint8)
        if self.random_flip and gen is not None and torch.rand(1, generator=gen).item() < 0.5:
            out = out[:, ::-1]
        out = out[None] if out.ndim == 2 else out.transpose(2, 0, 1)
        return np.ascontiguousarray(out)

    def _resize_and_crop(self, im: Image.Image, gen: torch.Generator | None) -> Image.Image:
        size = self.resolution
        assert size is not None
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), FILTERS[self.resize_filter])
        if self.crop == "random" and gen is not None:
            left = int(torch.randint(0, nw - size + 1, (1,), generator=gen))
            top = int(torch.randint(0, nh - size + 1, (1,), generator=gen))
        else:
            left, top = (nw - size) // 2, (nh - size) // 2
        return im.crop((left, top, left + size, top + size))
