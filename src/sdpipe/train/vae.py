"""Training a small VAE (`AutoencoderKL`) for `train.method: scratch` when no pretrained one fits: the
shapes demo's 32x32 images have no Stable Diffusion VAE offline, so it trains its own, with the shared
`Trainer` (resume, NaN policy, EMA) like every other model.

The loss is the reconstruction error of a posterior sample (L1 plus L2, pixel range [-1, 1]) plus a small KL
term that keeps the latents near N(0, 1) (Rombach et al. 2022 train with perceptual and GAN terms too; on
flat-coloured synthetic shapes the pixel losses suffice). Draw order from the run's generator: indices,
preprocessing draws, the posterior noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdpipe.config import PipelineConfig
from sdpipe.data import ImageSet
from sdpipe.train.loop import start_run
from sdpipe.train.state import EpochSampler
from sdpipe.train.trainer import Trainer

AutoencoderKL = Any  # diffusers' AutoencoderKL; its methods come from mixins mypy does not see
KL_WEIGHT = 1e-6  # as in Stable Diffusion's VAE training: latents stay close to unit scale, detail is kept


class VaeTask:
    """An `AutoencoderKL` trained to reconstruct `data`."""

    weighting = None

    def __init__(self, cfg: PipelineConfig, vae: AutoencoderKL, data: ImageSet, gen: torch.Generator) -> None:
        self.cfg, self.data, self.module = cfg, data, vae
        self.sampler = EpochSampler(len(data), cfg.train.batch_size, gen)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.module.named_parameters())

    def draw(self, gen: torch.Generator, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        idx = self.sampler.next()
        x, _ = self.data.batch(idx, gen, select=slice(rank, None, world))
        channels = int(self.module.config.latent_channels)
        factor = 2 ** (len(self.module.config.block_out_channels) - 1)
        _, _, h, w = (len(idx), *self.data.image_shape)
        eps = torch.randn((len(idx), channels, h // factor, w // factor), generator=gen)[rank::world]
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return x.to(device), eps.to(device)

    def loss(self, objective: Any, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, eps = batch
        posterior = model.encode(x).latent_dist  # type: ignore[operator]
        z = posterior.mean + posterior.std * eps
        rec = model.decode(z).sample  # type: ignore[operator]
        error = (rec - x).abs().mean() + (rec - x).pow(2).mean()
        loss = error + KL_WEIGHT * posterior.kl().mean()
        return loss, error.detach()

    def validator(self) -> Callable[[nn.Module], float] | None:
        return None


def train_vae(
    cfg: PipelineConfig,
    vae: AutoencoderKL,
    data: ImageSet,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: Callable[[int, dict], None] | None = None,
) -> AutoencoderKL:
    """Train `vae` on `data` as `cfg.train` says; returns its EMA weights (RUN holds checkpoints, metrics)."""
    run_dir = Path(run_dir)
    accelerator, gen = start_run(cfg.train, run_dir, resume)
    task = VaeTask(cfg, vae, data, gen)
    out = Trainer(cfg.train, cfg.model_dump(mode="json"), run_dir, task, accelerator, gen).run(resume, progress)
    return out.module


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, data: ImageSet, n: int = 512) -> float:
    """1 / std of the posterior means of `n` images: the `scaling_factor` that gives the diffusion model
    unit-variance latents, as Stable Diffusion's 0.18215 does for its VAE."""
    x, _ = data.batch(torch.arange(min(n, len(data))), torch.Generator().manual_seed(0))
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    mean = vae.encode(x.to(vae.device)).latent_dist.mean
    return float(1.0 / mean.float().std())
