"""Diffusion training losses, one small class each (in the style of NVlabs EDM `training/loss.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import nn


@dataclass(frozen=True)
class TextCond:
    """What a text-conditioned UNet (`UNet2DConditionModel`) takes besides x_t and t: the prompt embeddings
    (B, L, D) and, for SDXL, the added inputs (`text_embeds`, `time_ids`). Sliced like a tensor."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def __getitem__(self, part: Any) -> TextCond:
        added = None if self.added is None else {k: v[part] for k, v in self.added.items()}
        return TextCond(self.embeds[part], added)

    def to(self, device: torch.device | str) -> TextCond:
        added = None if self.added is None else {k: v.to(device) for k, v in self.added.items()}
        return TextCond(self.embeds.to(device), added)


@dataclass(frozen=True)
class TokenCond:
    """A caption batch as token ids, for a network that runs its text encoder(s) itself because they train
    (`sdpipe.train.t2i_text.TextAndUNet`): `ids` per tokenizer, and SDXL's `time_ids`. Sliced like a tensor."""

    ids: tuple[torch.Tensor, ...]
    time_ids: torch.Tensor | None = None

    def __getitem__(self, part: Any) -> TokenCond:
        return TokenCond(tuple(i[part] for i in self.ids), None if self.time_ids is None else self.time_ids[part])

    def to(self, device: torch.device | str) -> TokenCond:
        time_ids = None if self.time_ids is None else self.time_ids.to(device)
        return TokenCond(tuple(i.to(device) for i in self.ids), time_ids)


def predict(unet: nn.Module, x: torch.Tensor, level: torch.Tensor, cond: Any) -> torch.Tensor:
    """The network's output for input `x` at noise feature `level`, conditioned on class labels (a pixel
    `UNet2DModel`; None = unconditional), on a `TextCond` (a `UNet2DConditionModel`) or on a `TokenCond` (a
    `TextAndUNet`, which returns the tensor itself)."""
    if isinstance(cond, TokenCond):
        return unet(x, level, cond)
    if isinstance(cond, TextCond):
        return unet(x, level, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added).sample
    return unet(x, level, class_labels=cond).sample


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
    epsilon, v (Salimans & Ho 2022, "Progressive Distillation") or x0. Weighting, stated as a weight on the
    x0 error and converted for the target: uniform on the target; min-SNR-gamma, min(SNR, gamma) (Hang et al.
    2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"); or EDM's lambda(sigma) =
    (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 = SNR + 1/sigma_data^2 (Karras et al. 2022, Table 1)."""

    def __init__(
        self,
        noise_scheduler: DDPMScheduler,
        weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        sigma_data: float = 0.5,
    ) -> None:
        if weighting not in ("uniform", "min_snr", "edm"):
            raise ValueError(f"unknown loss weighting {weighting!r}: uniform, min_snr or edm")
        self.sched = noise_scheduler
        self.prediction_type = noise_scheduler.config["prediction_type"]
        alphas = noise_scheduler.alphas_cumprod
        self.snr = alphas / (1 - alphas)
        self.weighting, self.gamma, self.sigma_data = weighting, min_snr_gamma, sigma_data
        self.num_timesteps = len(alphas)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight for the chosen target."""
        if self.weighting == "uniform":
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr.to(t.device)[t]  # the table follows the timesteps' device
        w_x0 = snr.clamp(max=self.gamma) if self.weighting == "min_snr" else snr + 1 / self.sigma_data**2
        if self.prediction_type == "epsilon":  # ||x0 error||^2 = ||eps error||^2 / SNR
            return w_x0 / snr
        if self.prediction_type == "v_prediction":  # ||x0 error||^2 = ||v error||^2 / (SNR + 1)
            return w_x0 / (snr + 1)
        return w_x0

    def validation_level(self, quantile: torch.Tensor) -> torch.Tensor:
        """The noise level at `quantile` in [0, 1) of the levels validation covers: timesteps, uniformly."""
        return (quantile * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)

    def noise_feature(self, t: torch.Tensor) -> torch.Tensor:
        """ln(sigma_t) / 4 for sigma_t = sqrt((1 - abar) / abar): the noise level on EDM's c_noise scale."""
        return -0.125 * self.snr.to(t.device)[t].log()

    def __call__(
        self, unet: nn.Module, x0: torch.Tensor, labels: Any, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return self.per_sample(unet, x0, labels, noise, t).mean()

    def per_sample(
        self, unet: nn.Module, x0: torch.Tensor, labels: Any, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Each sample's weighted loss, shape (N,)."""
        xt = self.sched.add_noise(x0, noise, cast(torch.IntTensor, t))
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.sched.get_velocity(x0, noise, cast(torch.IntTensor, t))
        else:
            target = x0
        pred = predict(unet, xt, t, labels)
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        return self.weight(t).to(per_sample) * per_sample


class EDMLoss:
    """EDM preconditioning and loss (Karras et al. 2022, "Elucidating the Design Space...", Table 1):
    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with x = x0 + sigma n, ln(sigma) ~ N(p_mean, p_std^2),
    weighted by lambda(sigma) = 1 / c_out^2, i.e. a plain squared error on F's effective target. The
    conditioning matches diffusers' EDM schedulers (c_noise = ln(sigma) / 4, `prediction_type="epsilon"`), so
    the saved model samples with `EDMDPMSolverMultistepScheduler` in a vanilla diffusers loop."""

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return (self.p_mean + self.p_std * torch.randn(n, generator=generator)).exp()

    def validation_level(self, quantile: torch.Tensor) -> torch.Tensor:
        """The sigma at `quantile` in (0, 1) of the training distribution."""
        normal = torch.distributions.Normal(0.0, 1.0)
        return (self.p_mean + self.p_std * normal.icdf(quantile.float().clamp(1e-4, 1 - 1e-4))).exp()

    def noise_feature(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_noise = ln(sigma) / 4, what the network is told of the noise level."""
        return 0.25 * sigma.float().log()

    def __call__(
        self, unet: nn.Module, x0: torch.Tensor, labels: Any, noise: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        return self.per_sample(unet, x0, labels, noise, sigma).mean()

    def per_sample(
        self, unet: nn.Module, x0: torch.Tensor, labels: Any, noise: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """Each sample's weighted loss, shape (N,)."""
        sd = self.sigma_data
        s = sigma.float().view(-1, 1, 1, 1)
        x = x0 + s * noise
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        out = predict(unet, c_in * x, self.noise_feature(sigma), labels)
        target = (x0 - c_skip * x) / c_out
        return (out.float() - target).pow(2).mean(dim=(1, 2, 3))


class UncertaintyWeighting(nn.Module):
    """EDM2's learned loss weighting (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
    Diffusion Models", sec. 5, eq. 21): a sample's loss L at noise level sigma becomes L / exp(u) + u, where
    u(sigma) is a learned log-variance, a linear map of fixed random Fourier features of c_noise. Minimizing it
    drives exp(u(sigma)) to the expected loss at sigma, so every noise level weighs about equally in the
    gradient however hard it is. Zero-initialized, it starts out as the base loss. A call returns the
    objective and, for logging, the plain (unweighted) base loss."""

    freqs: torch.Tensor
    phases: torch.Tensor

    def __init__(self, base: DiffusionLoss | EDMLoss, channels: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.base = base
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=gen))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=gen))
        self.linear = nn.Linear(channels, 1, bias=False)
        nn.init.zeros_(self.linear.weight)

    def log_variance(self, level: torch.Tensor) -> torch.Tensor:
        """u at each sample's noise level (timesteps or sigmas, as the base loss takes them), shape (N,)."""
        c_noise = self.base.noise_feature(level).float()
        return self.linear(math.sqrt(2) * torch.cos(c_noise[:, None] * self.freqs + self.phases)).squeeze(1)

    def forward(
        self, unet: nn.Module, x0: torch.Tensor, labels: Any, noise: torch.Tensor, level: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.log_variance(level)
        plain = self.base.per_sample(unet, x0, labels, noise, level)
        return (plain / u.exp() + u).mean(), plain.detach().mean()
