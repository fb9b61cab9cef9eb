"""Samplers are diffusers schedulers, chosen by name and configured from the model's saved scheduler config
(so beta schedule, prediction type and timestep count always match how the model was trained)."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_edm_dpmsolver_multistep import EDMDPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_edm_euler import EDMEulerScheduler
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

# Models trained with EDM preconditioning (a saved config with `sigma_data`) sample with diffusers' EDM
# schedulers, which apply the preconditioning themselves. Both DPM-Solver++ names use EDM's Karras sigmas.
EDM_SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "euler": (EDMEulerScheduler, {}),
    "dpmpp_2m": (EDMDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (EDMDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
_EDM_KEYS = ("sigma_min", "sigma_max", "sigma_data", "prediction_type")

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


def edm_scheduler_config(sigma_min: float, sigma_max: float, sigma_data: float) -> dict[str, Any]:
    """EDM's noise levels as diffusers EDM scheduler settings (`prediction_type="epsilon"` selects EDM's own
    c_out, the one `sdpipe.train.losses.EDMLoss` trains with)."""
    return {"sigma_min": sigma_min, "sigma_max": sigma_max, "sigma_data": sigma_data, "prediction_type": "epsilon"}


def samplers_for(model_scheduler_config: dict[str, Any]) -> list[str]:
    """The sampler names that apply to a model with this saved scheduler config."""
    return list(EDM_SAMPLERS if "sigma_data" in model_scheduler_config else SAMPLERS)


def make_scheduler(name: str, model_scheduler_config: dict[str, Any]) -> Scheduler:
    """A fresh scheduler for sampler `name`, matching the noise schedule in `model_scheduler_config`."""
    edm = "sigma_data" in model_scheduler_config
    table, keys = (EDM_SAMPLERS, _EDM_KEYS) if edm else (SAMPLERS, _SHARED_KEYS)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(table)}")
    if name not in table:
        kind = "an EDM-preconditioned model" if edm else "this model"
        raise ValueError(f"sampler {name!r} does not apply to {kind}; choose one of: {', '.join(table)}")
    cls, extra = table[name]
    shared = {k: model_scheduler_config[k] for k in keys if k in model_scheduler_config}
    return cls(**shared, **extra)
