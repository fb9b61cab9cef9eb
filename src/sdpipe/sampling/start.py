"""Where a micro-batch's sampling starts: from noise (text-to-image, pixel models), from a noised input image
(img2img), or around a mask (inpainting, with 9-channel inpainting UNets and with ordinary 4-channel ones).

Each row draws from its own CPU generator in diffusers' order, so a row is the same image whatever its batch
and the same, to float tolerance, as the matching diffusers pipeline given one generator per image:
the input image's VAE posterior sample (when the start needs it), then the initial noise, then (inpainting)
the masked image's posterior sample. Schedules follow `StableDiffusion[Img2Img|Inpaint]Pipeline`:
`strength` keeps the last `int(steps * strength)` steps, begun with `set_begin_index`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sdpipe.conditioning import Conditioning

# constraint(x after step i, i) -> x, run after each step (4-channel inpainting keeps the unmasked region)
Constraint = Callable[[torch.Tensor, int], torch.Tensor]
Scheduler = Any


@dataclass
class Start:
    x: torch.Tensor  # the sample the loop begins with
    begin: int = 0  # index into the scheduler's timesteps of the first step
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # more denoiser inputs, per row (not doubled)
    constraint: Constraint | None = None


def noise_rows(gens: list[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Row r's noise from generator r: `torch.randn(shape, generator=g, dtype=dtype)`, diffusers' per-image
    CPU generator draw (the same values as `randn_tensor` with a list of generators)."""
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in gens])


def start_batch(
    parts: Any, conds: list[Conditioning | None], gens: list[torch.Generator], sched: Scheduler, steps: int
) -> Start:
    """The start of one micro-batch whose rows are `conds` (None: padding) after `sched.set_timesteps(steps)`."""
    real = next(c for c in conds if c is not None)
    shape = parts.sample_shape(real)
    if real.init is None:
        x = noise_rows(gens, shape, parts.dtype).to(parts.device)
        return Start(x * sched.init_noise_sigma)
    return _start_from_image(parts, [c or real for c in conds], gens, sched, steps, shape)


def strength_start(steps: int, strength: float, order: int) -> int:
    """The timestep index img2img and inpainting begin at: `strength` keeps the last int(steps * strength)
    steps (diffusers' `get_timesteps`); refused when it keeps none."""
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(
            f"--strength {strength} with --steps {steps} keeps no sampling step (steps x strength < 1): raise either"
        )
    return (steps - kept) * order


def _start_from_image(
    parts: Any,
    conds: list[Conditioning],
    gens: list[torch.Generator],
    sched: Scheduler,
    steps: int,
    shape: tuple[int, ...],
) -> Start:
    first = conds[0]
    inpaint = first.mask is not None
    strength = first.strength if first.strength is not None else (1.0 if inpaint else 0.8)
    begin = strength_start(steps, strength, getattr(sched, "order", 1))
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    t0 = sched.timesteps[begin : begin + 1].repeat(len(conds))
    nine = inpaint and parts.in_channels == 9
    images = [parts.image_tensor(c) for c in conds]
    masks = [parts.mask_tensor(c) for c in conds] if inpaint else []
    want_latents = not inpaint or not nine or strength < 1.0
    latents, noise, masked = [], [], []
    for i, g in enumerate(gens):  # each row's draws in diffusers' order, from its own generator
        if want_latents:
            latents.append(parts.posterior(images[i], g))
        noise.append(torch.randn(shape, generator=g, dtype=parts.dtype))
        if inpaint:
            masked.append(parts.posterior(images[i] * (masks[i] < 0.5), g))
    z = torch.stack(noise).to(parts.device)
    pure_noise = inpaint and strength == 1.0  # the pipelines' `is_strength_max`
    x = z * sched.init_noise_sigma if pure_noise else sched.add_noise(torch.cat(latents), z, t0)
    if not inpaint:
        return Start(x, begin)
    mask = torch.cat([parts.latent_mask(m) for m in masks]).to(parts.device, parts.dtype)
    if nine:
        return Start(x, begin, {"mask": mask, "masked_latents": torch.cat(masked)})
    return Start(x, begin, constraint=_keep_unmasked(sched, torch.cat(latents), z, mask, begin))


def _keep_unmasked(
    sched: Scheduler, image_latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, begin: int
) -> Constraint:
    """4-channel inpainting, as `StableDiffusionInpaintPipeline` does it: after each step the region to keep
    (mask 0) is replaced by the input image's latents noised to the next timestep (clean after the last)."""
    timesteps = sched.timesteps[begin:]

    def constrain(x: torch.Tensor, i: int) -> torch.Tensor:
        known = image_latents
        if i < len(timesteps) - 1:
            known = sched.add_noise(image_latents, noise, torch.tensor([timesteps[i + 1]]))
        return (1 - mask) * known + mask * x

    return constrain
