"""What one image (or, later, one table row) is conditioned on, except its seed: one typed value that flows
from the command line and the server through sampling into `samples.jsonl` and the PNG's metadata.

A leaf module (pydantic only). Values are frozen and hashable, so they key caches (text embeddings) and group
rows into micro-batches: rows that share a `batch_key` can share a network batch; the rest of a
`Conditioning` (label, prompt, negative prompt) may differ row by row.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LoraRef(BaseModel):
    """A LoRA to apply: a file path or a registry reference (NAME@ALIAS), its weight, and its hash once known."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    ref: str
    weight: float = 1.0
    sha256: str | None = None


class DataRef(BaseModel):
    """An input image or mask, named by the sha256 of its bytes; the bytes travel beside it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    sha256: str
    path: str | None = None


class SizeCond(BaseModel):
    """SDXL's size micro-conditioning; None sizes mean the image's own (height, width), as diffusers does."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None


class Conditioning(BaseModel):
    """Everything an image is made from besides its seed and the sampler settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    label: str | None = None  # pixel-space class models: a class name
    prompt: str | None = None  # text-to-image models
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    init: DataRef | None = None  # img2img: the starting image
    strength: float | None = Field(default=None, ge=0.0, le=1.0)
    mask: DataRef | None = None  # inpainting: white (1) = repaint, black (0) = keep, as in diffusers
    size: SizeCond | None = None
    clip_skip: int = Field(default=1, ge=1, le=12)  # web-UI convention: 1 = the last layer (diffusers' None)
    loras: tuple[LoraRef, ...] = ()

    def batch_key(self) -> tuple:
        """What rows of one micro-batch must share: the tensor shape, the sampling schedule (strength), the
        adapters and the text-encoder layer. Labels and prompts may differ between rows."""
        return (
            self.width,
            self.height,
            self.init is not None,
            self.mask is not None,
            self.strength,
            self.loras,
            self.clip_skip,
            self.size,
        )
