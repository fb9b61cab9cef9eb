"""Sampling stage: diffusers schedulers by name, and seed-per-image generation."""

from sdpipe.sampler_names import PIXEL_SAMPLERS
from sdpipe.sampling.generate import SampleSpec, denoise, generate
from sdpipe.sampling.schedulers import (
    edm_scheduler_config,
    make_scheduler,
    samplers_for,
    training_scheduler_config,
)

__all__ = [
    "PIXEL_SAMPLERS",
    "SampleSpec",
    "denoise",
    "edm_scheduler_config",
    "generate",
    "make_scheduler",
    "samplers_for",
    "training_scheduler_config",
]
