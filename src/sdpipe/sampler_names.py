"""The one table of sampler names: sdpipe's own and the web UIs', each mapped onto a diffusers scheduler.

Everything that lists or accepts sampler names derives from `SAMPLERS`: the config's `sample.sampler`, the
scheduler factory, the CLI's help, `sdpipe evaluate --samplers`, the server and `/sdapi/v1/samplers`. Either
name is accepted, in any case (`resolve`). This module is data only and imports nothing from sdpipe or
diffusers (the classes are named by string and imported where schedulers are built).

`pixel`: the sampler applies to sdpipe's pixel-space class models (the digits), whose scheduler settings are a
filtered copy of the training schedule (the seven they have always had; the others are for pipelines);
`edm`: the diffusers EDM scheduler used when such a model was trained with EDM preconditioning (None: none).
Stable Diffusion pipelines take every row, built with `cls.from_config(model's scheduler config, **overrides)`,
diffusers' own idiom.

Two rows need care. The web UIs' "DPM++ SDE Karras" is k-diffusion's stochastic `sample_dpmpp_sde`, which
diffusers ports as `DPMSolverSDEScheduler` (its overview table lists the deterministic single-step solver
instead); its noise comes from torchsde Brownian trees, one per row, seeded with the row's seed. "LCM" is
`LCMScheduler`, meant for LCM-distilled UNets and LCM-LoRAs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplerName:
    name: str  # sdpipe's name, as configs and samples.jsonl write it
    webui: str  # the web UIs' name, as their infotext and API write it
    scheduler: str  # diffusers class name
    overrides: dict[str, Any] = field(default_factory=dict)
    pixel: bool = True  # applies to sdpipe's pixel-space class models
    edm: str | None = None  # diffusers' EDM scheduler for EDM-trained pixel models


_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_KARRAS = {"use_karras_sigmas": True}
_EDM_DPMPP = "EDMDPMSolverMultistepScheduler"

SAMPLERS: dict[str, SamplerName] = {
    s.name: s
    for s in (
        SamplerName("ddpm", "DDPM", "DDPMScheduler"),
        SamplerName("ddim", "DDIM", "DDIMScheduler"),
        SamplerName("euler", "Euler", "EulerDiscreteScheduler", edm="EDMEulerScheduler"),
        SamplerName("euler_a", "Euler a", "EulerAncestralDiscreteScheduler", pixel=False),
        SamplerName("heun", "Heun", "HeunDiscreteScheduler"),
        SamplerName("lms", "LMS", "LMSDiscreteScheduler", pixel=False),
        SamplerName(
            "dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP, edm="EDMDPMSolverMultistepScheduler"
        ),
        SamplerName(
            "dpmpp_2m_karras",
            "DPM++ 2M Karras",
            "DPMSolverMultistepScheduler",
            {**_DPMPP, "use_karras_sigmas": True},
            edm=_EDM_DPMPP,  # EDM's sigmas are Karras sigmas already
        ),
        SamplerName(
            "dpmpp_sde_karras", "DPM++ SDE Karras", "DPMSolverSDEScheduler", {"use_karras_sigmas": True}, pixel=False
        ),
        SamplerName("unipc", "UniPC", "UniPCMultistepScheduler"),
        SamplerName("lcm", "LCM", "LCMScheduler", pixel=False),
    )
}

PIXEL_SAMPLERS = tuple(s.name for s in SAMPLERS.values() if s.pixel)
EDM_SAMPLERS = tuple(s.name for s in SAMPLERS.values() if s.edm is not None)
_BY_ANY_NAME = {key.lower(): s.name for s in SAMPLERS.values() for key in (s.name, s.webui)}


def resolve(name: str) -> str:
    """sdpipe's name for a sampler given by either name in any case ('Euler a', 'dpm++ 2m karras', 'euler_a');
    ValueError listing the choices for an unknown one."""
    found = _BY_ANY_NAME.get(name.strip().lower())
    if found is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {choices()}")
    return found


def choices(names: tuple[str, ...] | list[str] | None = None) -> str:
    """'ddpm (DDPM), ddim (DDIM), ...': the names a user may give, for help texts and errors."""
    return ", ".join(f"{n} ({SAMPLERS[n].webui})" for n in (names if names is not None else list(SAMPLERS)))
