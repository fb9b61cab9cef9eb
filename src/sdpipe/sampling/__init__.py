"""Sampling stage: diffusers schedulers by name, and seed-per-image generation."""

from sdpipe.sampling.generate import SampleSpec, denoise, generate
from sdpipe.sampling.schedulers import (
    SAMPLERS,
    edm_scheduler_config,
    make_scheduler,
    samplers_for,
    training_scheduler_config,
)

__all__ = [
    "SAMPLERS",
    "SampleSpec",
    "denoise",
    "edm_scheduler_config",
    "generate",
    "make_scheduler",
    "samplers_for",
    "training_scheduler_config",
]
