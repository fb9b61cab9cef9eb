"""What a loaded model hands the one generation path (`sdpipe.sampling.generate`): its conditioning encoder,
denoiser and decoder, and the rules by which its sampling loop differs from another kind's.

Every kind implements `Parts`: sdpipe's pixel-space class models here (`PixelClassParts`), Stable Diffusion
pipelines in `sdpipe.models.pipelines`. The sampling loop, the micro-batches and the per-row noise are the
same code for all of them; only these methods and `SamplingRules` differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers.models.unets.unet_2d import UNet2DModel

from sdpipe.conditioning import Conditioning

# the conditioning of one micro-batch, laid out for the denoiser (classifier-free guidance rows included)
Encoded = dict[str, Any]


@dataclass(frozen=True)
class SamplingRules:
    """Where the sampling loops of two kinds differ.

    cond_first: classifier-free guidance stacks [conditional, unconditional] rows (sdpipe's pixel models, as
        trained) or [unconditional, conditional] (diffusers' pipelines).
    guide_above_one: guidance runs when the scale is > 1 (diffusers' `do_classifier_free_guidance`) rather
        than whenever it is not 1.
    begin_at_zero: call `set_begin_index(0)`: repeated first timesteps (Karras sigmas on a cosine schedule)
        would otherwise make diffusers start at index 1 and run off the end.
    filtered_scheduler: build schedulers from the training schedule's keys only (sdpipe's pixel models: a
        DDPM config's `timestep_spacing` must not change DPM-Solver), else `cls.from_config` (pipelines).
    """

    cond_first: bool
    guide_above_one: bool
    begin_at_zero: bool
    filtered_scheduler: bool

    def guided(self, guidance: float) -> bool:
        return guidance > 1.0 if self.guide_above_one else guidance != 1.0


PIXEL_RULES = SamplingRules(cond_first=True, guide_above_one=False, begin_at_zero=True, filtered_scheduler=True)
PIPELINE_RULES = SamplingRules(cond_first=False, guide_above_one=True, begin_at_zero=False, filtered_scheduler=False)


class Parts(Protocol):
    """A model as the generation path sees it. Rows of a micro-batch are given as a list of `Conditioning`s,
    None for a padding row (whose output is thrown away)."""

    rules: SamplingRules
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype  # of the initial noise and the denoiser's input

    def conditional(self) -> bool:
        """Whether the model takes conditioning at all (else guidance never runs)."""
        ...

    @property
    def embeds_guidance(self) -> bool:
        """Whether the network takes the guidance scale as an input (LCM UNets) instead of running CFG."""
        ...

    def guidance_inputs(self, guidance: float, batch: int) -> Encoded:
        """Denoiser inputs made from the guidance scale (LCM's `timestep_cond`); usually none."""
        ...

    def sample_shape(self, cond: Conditioning) -> tuple[int, ...]:
        """The shape of one row's initial noise, (C, H, W) in the denoiser's space."""
        ...

    def prepare(self, cond: Conditioning) -> None:
        """Set what a micro-batch shares (its `batch_key`), e.g. its LoRAs, before it is encoded."""
        ...

    def encode(self, rows: Sequence[Conditioning | None], guided: bool) -> Encoded:
        """The micro-batch's conditioning, for `denoise` (with the unconditional rows when `guided`)."""
        ...

    def denoise(self, x: torch.Tensor, t: torch.Tensor, encoded: Encoded) -> torch.Tensor:
        """The network's output for input x (rows doubled when guided) at timestep t."""
        ...

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled rows -> images in [-1, 1] (N, C, H, W), float32."""
        ...


class PixelClassParts:
    """sdpipe's class-conditional (or unconditional) pixel-space UNet: the identity decoder, labels by name,
    and the null label as the unconditional row; the operations and their order are those the digits
    models have always sampled with, so their images stay bit for bit."""

    rules = PIXEL_RULES
    dtype = torch.float32

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler_config: dict[str, Any],
        class_names: list[str] | None,
        null_label: int | None,
        shape: tuple[int, int, int],
    ) -> None:
        self.unet = unet
        self.scheduler_config = scheduler_config
        self.class_names = class_names
        self.null_label = null_label
        self.shape = shape
        self.device = next(unet.parameters()).device

    def conditional(self) -> bool:
        return self.class_names is not None

    embeds_guidance = False

    def guidance_inputs(self, guidance: float, batch: int) -> Encoded:
        return {}

    def sample_shape(self, cond: Conditioning) -> tuple[int, ...]:
        return self.shape

    def prepare(self, cond: Conditioning) -> None:
        return None

    def label_index(self, cond: Conditioning | None) -> int:
        """A row's label index; padding rows take the null label (0 without one)."""
        if cond is None or cond.label is None:
            return self.null_label if self.null_label is not None else 0
        assert self.class_names is not None  # an unconditional model is given no labels (parse_labels)
        return self.class_names.index(cond.label)

    def encode(self, rows: Sequence[Conditioning | None], guided: bool) -> Encoded:
        if self.class_names is None:
            return {"class_labels": None}
        labels = torch.tensor([self.label_index(c) for c in rows], device=self.device)
        if guided:
            if self.null_label is None:
                raise ValueError("classifier-free guidance needs a class-conditional model with a null label")
            labels = torch.cat([labels, torch.full_like(labels, self.null_label)])
        return {"class_labels": labels}

    def denoise(self, x: torch.Tensor, t: torch.Tensor, encoded: Encoded) -> torch.Tensor:
        return self.unet(x, t, class_labels=encoded["class_labels"]).sample

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x
