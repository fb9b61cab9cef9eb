"""Sampling stage: diffusers schedulers by name, and seed-per-image generation."""

from sdpipe.sampling.generate import SampleSpec, denoise, generate
from sdpipe.sampling.schedulers import SAMPLERS, make_scheduler, training_scheduler_config

__all__ = ["SAMPLERS", "SampleSpec", "denoise", "generate", "make_scheduler", "training_scheduler_config"]
