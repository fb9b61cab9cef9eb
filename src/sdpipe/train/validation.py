"""Validation during training: a deterministic validation loss and early stopping on it.

The loss is the training loss (same target and weighting) on held-out images, with the noise and the noise
levels of every validation image fixed by a seed: two evaluations of the same weights give the same number,
so a change in it is a change in the model, not in the draw. Each image is scored at `draws` stratified
noise levels, the quantiles (k + u) / draws of the loss's validation levels for k = 0..draws-1 with one
uniform offset u per image, which covers all noise levels with far less variance than one random draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdpipe.train.losses import DiffusionLoss, EDMLoss


@torch.inference_mode()
def validation_loss(
    unet: nn.Module,
    loss: DiffusionLoss | EDMLoss,
    x0: torch.Tensor,
    labels: Any,
    *,
    seed: int = 0,
    draws: int = 4,
    chunk: int = 256,
) -> float:
    """Mean weighted denoising loss of `unet` on `x0` (N, C, H, W) in the model range, with labels (N,) or
    None, at fixed noise: the same weights, data and seed always give the same value."""
    if len(x0) == 0:
        raise ValueError("validation_loss needs at least one validation image")
    gen = torch.Generator().manual_seed(seed)
    n = len(x0)
    offset = torch.rand(n, generator=gen, dtype=torch.float64)
    noise = torch.randn((draws, *x0.shape), generator=gen)
    was_training = unet.training
    unet.eval()
    total = 0.0
    try:
        for k in range(draws):
            t = loss.validation_level((k + offset) / draws)
            for i in range(0, n, chunk):
                part = slice(i, i + chunk)
                y = None if labels is None else labels[part]
                batch_loss = loss(unet, x0[part], y, noise[k, part].to(x0), t[part].to(x0.device))
                total += batch_loss.item() * len(x0[part])
    finally:
        unet.train(was_training)
    return total / (n * draws)


@dataclass
class EarlyStopping:
    """Stops when the validation loss has not improved on its best for `patience` validations in a row
    (patience None: never stops, but still tracks the best)."""

    patience: int | None = None
    best: float = float("inf")
    best_step: int = 0
    since_best: int = 0

    def update(self, step: int, value: float) -> bool:
        """Record a validation; True when it is a new best."""
        if value < self.best:
            self.best, self.best_step, self.since_best = value, step, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience
