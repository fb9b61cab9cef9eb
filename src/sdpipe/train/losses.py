"""Diffusion training losses, one small class each (in the style of NVlabs EDM `training/loss.py`)."""

from __future__ import annotations

from typing import cast

import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler


class TimestepSampler:
    """Draws training timesteps: uniformly, or so that sigma = sqrt((1 - abar) / abar) follows EDM's
    log-normal ln(sigma) ~ N(mean, std^2) (Karras et al. 2022, "Elucidating the Design Space...", sec. 5),
    each draw mapped to the timestep whose sigma is nearest in log space."""

    def __init__(
        self, noise_scheduler: DDPMScheduler, kind: str = "uniform", mean: float = -1.2, std: float = 1.2
    ) -> None:
        alphas = noise_scheduler.alphas_cumprod.double()
        self.log_sigmas = 0.5 * torch.log((1 - alphas) / alphas)  # increasing with t
        self.kind, self.mean, self.std = kind, mean, std

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "uniform":
            return torch.randint(0, len(self.log_sigmas), (n,), generator=generator)
        log_sigma = self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64)
        idx = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        nearer_lower = (log_sigma - self.log_sigmas[idx - 1]) < (self.log_sigmas[idx] - log_sigma)
        return idx - nearer_lower.long()


class DiffusionLoss:
    """Denoising loss for the discrete-time DDPM forward process (Ho et al. 2020), with target
    epsilon, v (Salimans & Ho 2022, "Progressive Distillation") or x0, and optional min-SNR-gamma weighting
    (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy")."""

    def __init__(self, noise_scheduler: DDPMScheduler, min_snr_gamma: float | None = None) -> None:
        self.sched = noise_scheduler
        self.prediction_type = noise_scheduler.config["prediction_type"]
        alphas = noise_scheduler.alphas_cumprod
        self.snr = alphas / (1 - alphas)
        self.gamma = min_snr_gamma

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight: min(SNR, gamma) turned into the weight for the chosen target."""
        if self.gamma is None:
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr[t]
        w = snr.clamp(max=self.gamma)
        if self.prediction_type == "epsilon":
            return w / snr
        if self.prediction_type == "v_prediction":
            return w / (snr + 1)
        return w  # x0 target

    def __call__(
        self, unet: UNet2DModel, x0: torch.Tensor, labels: torch.Tensor | None, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        xt = self.sched.add_noise(x0, noise, cast(torch.IntTensor, t))
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.sched.get_velocity(x0, noise, cast(torch.IntTensor, t))
        else:
            target = x0
        pred = unet(xt, t, class_labels=labels).sample
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        return (self.weight(t).to(per_sample) * per_sample).mean()
