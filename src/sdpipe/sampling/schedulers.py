"""Samplers are diffusers schedulers, chosen by name and configured from the model's saved scheduler config
(so beta schedule, prediction type and timestep count always match how the model was trained)."""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from sdpipe.sampler_names import EDM_SAMPLERS, PIXEL_SAMPLERS, SAMPLERS, choices, resolve

# diffusers' schedulers share no typed base class that declares step()/set_timesteps(): typed structurally.
Scheduler = Any

_EDM_KEYS = ("sigma_min", "sigma_max", "sigma_data", "prediction_type")

# Keys of a training config that every sampler shares; the rest of a saved config is sampler-specific.
_SHARED_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "trained_betas")


def scheduler_class(class_name: str) -> Any:
    """A diffusers scheduler class by name (imported on first use: DPMSolverSDEScheduler needs torchsde)."""
    return getattr(importlib.import_module("diffusers"), class_name)


def training_scheduler_config(
    prediction_type: str, beta_schedule: str, num_train_timesteps: int, schedule_shift: float = 1.0
) -> dict[str, Any]:
    """The noise schedule as diffusers scheduler settings. `schedule_shift` s != 1 multiplies every
    signal-to-noise ratio by s**2 (logSNR + 2 log s; Hoogeboom et al. 2023, "simple diffusion"), so small
    images are trained and sampled less at noise levels that have already erased them; the result is
    stored as `trained_betas`, which every diffusers scheduler reads."""
    config: dict[str, Any] = {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": beta_schedule,
        "prediction_type": prediction_type,
        "beta_start": 0.0001,
        "beta_end": 0.02,
    }
    if schedule_shift != 1.0:
        base = DDPMScheduler(**config).alphas_cumprod.double()
        shifted = torch.sigmoid(torch.logit(base) + 2 * math.log(schedule_shift))
        prev = torch.cat([torch.ones(1, dtype=shifted.dtype), shifted[:-1]])
        config["trained_betas"] = (1 - shifted / prev).clamp(max=0.999).tolist()
    return config


def edm_scheduler_config(sigma_min: float, sigma_max: float, sigma_data: float) -> dict[str, Any]:
    """EDM's noise levels as diffusers EDM scheduler settings (`prediction_type="epsilon"` selects EDM's own
    c_out, the one `sdpipe.train.losses.EDMLoss` trains with)."""
    return {"sigma_min": sigma_min, "sigma_max": sigma_max, "sigma_data": sigma_data, "prediction_type": "epsilon"}


def samplers_for(model_scheduler_config: dict[str, Any]) -> list[str]:
    """The sampler names that apply to a pixel-space class model with this saved scheduler config."""
    return list(EDM_SAMPLERS if "sigma_data" in model_scheduler_config else PIXEL_SAMPLERS)


def make_scheduler(name: str, model_scheduler_config: dict[str, Any]) -> Scheduler:
    """A fresh scheduler for sampler `name` (either name, see `sdpipe.sampler_names`) for a pixel-space class
    model: only the training schedule's keys are kept from `model_scheduler_config` (`_SHARED_KEYS`), so a
    DDPM config's `timestep_spacing` never changes what DPM-Solver does to these models."""
    name = resolve(name)
    edm = "sigma_data" in model_scheduler_config
    usable, keys = (EDM_SAMPLERS, _EDM_KEYS) if edm else (PIXEL_SAMPLERS, _SHARED_KEYS)
    if name not in usable:
        kind = "an EDM-preconditioned model" if edm else "this model"
        raise ValueError(f"sampler {name!r} does not apply to {kind}; choose one of: {choices(list(usable))}")
    row = SAMPLERS[name]
    overrides = dict(row.overrides)
    if edm:  # EDM's sigmas are Karras sigmas already: its schedulers take no such switch
        overrides.pop("use_karras_sigmas", None)
    cls = scheduler_class(row.edm if edm and row.edm else row.scheduler)
    shared = {k: model_scheduler_config[k] for k in keys if k in model_scheduler_config}
    return cls(**shared, **overrides)


def pipeline_scheduler(name: str, model_scheduler_config: dict[str, Any], seeds: list[int] | None = None) -> Scheduler:
    """A fresh scheduler for sampler `name` for a Stable Diffusion pipeline: `cls.from_config(saved config,
    **overrides)`, as diffusers swaps schedulers, so `timestep_spacing`, `steps_offset` and SD 2's
    `v_prediction` carry over. `seeds` (one per batch row) seed DPM++ SDE's Brownian trees, one tree per row."""
    row = SAMPLERS[resolve(name)]
    sched = scheduler_class(row.scheduler).from_config(model_scheduler_config, **row.overrides)
    if seeds is not None and hasattr(sched, "noise_sampler_seed"):
        sched.noise_sampler_seed = list(seeds)
    return sched
