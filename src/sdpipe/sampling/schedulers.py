"""Samplers are diffusers schedulers, chosen by name and configured from the model's saved scheduler config
(so beta schedule, prediction type and timestep count always match how the model was trained)."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteScheduler
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

# diffusers' schedulers share no typed base class that declares step()/set_timesteps(): typed structurally.
Scheduler = Any

# name -> (scheduler class, settings that make it that sampler)
SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": (UniPCMultistepScheduler, {}),
}

# Keys of a training config that every sampler shares; the rest of a saved config is sampler-specific.
_SHARED_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "trained_betas")


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


def make_scheduler(name: str, model_scheduler_config: dict[str, Any]) -> Scheduler:
    """A fresh scheduler for sampler `name`, matching the noise schedule in `model_scheduler_config`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    shared = {k: model_scheduler_config[k] for k in _SHARED_KEYS if k in model_scheduler_config}
    return cls(**shared, **extra)
