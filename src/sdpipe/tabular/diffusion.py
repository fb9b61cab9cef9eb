"""The forward processes, the loss and the sampler of a table diffusion model (docs/table-models.md).

* Numbers: Gaussian DDPM (Ho et al. 2020) with a diffusers `DDPMScheduler` (betas, `add_noise`), the
  network predicting the noise or the clean values, as in TabDDPM (Kotelnikov et al. 2023).
* Categories, "masked": absorbing-state diffusion (Austin et al. 2021, "Structured Denoising Diffusion
  Models in Discrete State-Spaces"; Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language
  Models"): at step t a cell keeps its category with probability alpha_bar_t (the numbers' remaining signal
  variance) and is the MASK index otherwise; the loss is the cross-entropy of the original category on
  masked cells; sampling unmasks a masked cell between t and s with probability (abar_s - abar_t) /
  (1 - abar_t), drawing its category from the predicted distribution.
* Categories, "onehot": one-hot vectors scaled to +-1 join the Gaussian block; decoded by argmax.

The loss (`TableLoss`) is one small class in the style of EDM's `training/loss.py`; sampling is a pure
function over tensors (k-diffusion style) that takes every random number from a `NoiseBank` drawn per row,
so a row's result never depends on the other rows of its batch. Imputation holds known cells fixed the
RePaint way (Lugmayr et al. 2022): a known number is replaced by its forward-noised value at every step and
copied back exactly at the end; a known category is never masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import nn

from sdpipe.tabular.model_config import TableModelConfig

X0_LIMIT = 6.0  # clean-value estimates are clipped here while sampling (quantile scaling stays within ~5.2)


def make_scheduler(cfg: TableModelConfig) -> DDPMScheduler:
    """The numbers' DDPM forward process; "trailing" spacing, so sampling starts at the last timestep."""
    return DDPMScheduler(
        num_train_timesteps=cfg.train_steps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        timestep_spacing="trailing",
        clip_sample=False,
    )


class TableDiffusion:
    """Both forward processes of one table layout: `numeric_width` numbers and `category_sizes` categories."""

    def __init__(self, cfg: TableModelConfig, numeric_width: int, category_sizes: list[int]) -> None:
        self.cfg, self.numeric_width, self.sizes = cfg, numeric_width, list(category_sizes)
        self.masked = cfg.categorical == "masked"
        self.sched = make_scheduler(cfg)
        self.alphas_cumprod = self.sched.alphas_cumprod.float()
        self.gaussian_width = numeric_width + (0 if self.masked else sum(self.sizes))

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def onehot(self, tokens: torch.Tensor) -> torch.Tensor:
        """Category indices (B, C) as concatenated one-hots scaled to +-1, (B, sum of sizes)."""
        parts = [F.one_hot(tokens[:, j], s).float() * 2 - 1 for j, s in enumerate(self.sizes)]
        return torch.cat(parts, dim=1) if parts else tokens.new_zeros((len(tokens), 0), dtype=torch.float32)

    def spread(self, cells: torch.Tensor) -> torch.Tensor:
        """A per-category-column value (B, C) repeated over each column's one-hot or logit slots."""
        sizes = torch.tensor(self.sizes, device=cells.device)
        return cells.repeat_interleave(sizes, dim=1)

    def gaussian(self, numeric: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The clean Gaussian block: the numbers, plus the one-hot categories in "onehot" mode."""
        return numeric if self.masked else torch.cat([numeric, self.onehot(tokens)], dim=1)

    def gaussian_mask(self, numeric_mask: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        return numeric_mask if self.masked else torch.cat([numeric_mask, self.spread(token_mask)], dim=1)

    def mask_tokens(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """`tokens` with the MASK index (each column's size) where `masked`."""
        mask_index = torch.tensor(self.sizes, device=tokens.device).expand_as(tokens)
        return torch.where(masked, mask_index, tokens)


class TableLoss:
    """The training loss of one sample: the (observed-cell) mean squared error of the Gaussian block's
    target, plus, in "masked" mode, the cross-entropy of the masked categories summed over cells and divided
    by the column count (TabDDPM's sum of a Gaussian and a categorical loss). Unobserved cells (a missing
    number's fill-in, a category of a missing cell) carry no loss."""

    def __init__(self, diffusion: TableDiffusion) -> None:
        self.d = diffusion

    def __call__(self, model: nn.Module, *batch: torch.Tensor) -> torch.Tensor:
        return self.per_sample(model, *batch).mean()

    def per_sample(
        self,
        model: nn.Module,
        numeric: torch.Tensor,
        tokens: torch.Tensor,
        numeric_observed: torch.Tensor,
        token_observed: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        u: torch.Tensor,
    ) -> torch.Tensor:
        """Each sample's loss (B,); `noise` (B, G) and `t` (B,) for the Gaussian block, `u` (B, C) uniform
        numbers deciding which categories are masked ("masked" mode)."""
        d = self.d
        x0 = d.gaussian(numeric, tokens)
        xt = d.sched.add_noise(x0, noise, cast(torch.IntTensor, t))
        target = noise if d.cfg.prediction_type == "epsilon" else x0
        keep = d.alphas_cumprod.to(t.device)[t][:, None]
        masked = u >= keep  # P(masked) = 1 - alpha_bar_t
        inputs = d.mask_tokens(tokens, masked) if d.masked else None
        out = model(xt, inputs, t).float()
        g = d.gaussian_width
        weight = d.gaussian_mask(numeric_observed, token_observed).float()
        loss = (weight * (out[:, :g] - target).pow(2)).sum(1) / max(g, 1)
        if d.masked and d.sizes:
            ce = torch.stack(
                [
                    F.cross_entropy(part, tokens[:, j], reduction="none")
                    for j, part in enumerate(_split(out, g, d.sizes))
                ],
                dim=1,
            )
            loss = loss + (ce * (masked & token_observed).float()).sum(1) / len(d.sizes)
        return loss


def _split(out: torch.Tensor, start: int, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """The per-column logit slices of a network output after its first `start` columns."""
    return torch.split(out[:, start : start + sum(sizes)], sizes, dim=1)


@dataclass
class NoiseBank:
    """Every random number one sampling run uses, per row, so a row's draw depends on its own generator only:
    `start` (B, G), per step `noise` and `known_noise` (S, B, G), `unmask` and `pick` uniforms (S, B, C)."""

    start: torch.Tensor
    noise: torch.Tensor
    known_noise: torch.Tensor
    unmask: torch.Tensor
    pick: torch.Tensor

    @classmethod
    def draw(cls, gens: list[torch.Generator], steps: int, gaussian: int, categories: int) -> NoiseBank:
        """One row per generator, each drawn in the order start, noise, known_noise, unmask, pick."""
        rows = []
        for g in gens:
            rows.append(
                (
                    torch.randn(gaussian, generator=g),
                    torch.randn(steps, gaussian, generator=g),
                    torch.randn(steps, gaussian, generator=g),
                    torch.rand(steps, categories, generator=g),
                    torch.rand(steps, categories, generator=g),
                )
            )
        start, noise, known, unmask, pick = (torch.stack(parts, dim=-2) for parts in zip(*rows, strict=True))
        return cls(start, noise, known, unmask, pick)

    def to(self, device: torch.device) -> NoiseBank:
        return NoiseBank(*(v.to(device) for v in (self.start, self.noise, self.known_noise, self.unmask, self.pick)))


@dataclass
class Known:
    """Cells a sampling run holds fixed: numbers (B, Dn) where `numeric_mask`, categories (B, C) where
    `token_mask`; `forbid` (B, sum of sizes) marks categories a cell may not take (the missing category of
    a cell being imputed)."""

    numeric: torch.Tensor
    numeric_mask: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor
    forbid: torch.Tensor

    @classmethod
    def nothing(cls, rows: int, numeric_width: int, sizes: list[int], device: torch.device) -> Known:
        def zeros(width: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(rows, width, dtype=dtype, device=device)

        return cls(
            zeros(numeric_width, torch.float32),
            zeros(numeric_width, torch.bool),
            zeros(len(sizes), torch.int64),
            zeros(len(sizes), torch.bool),
            zeros(sum(sizes), torch.bool),
        )


def _pick(logits: torch.Tensor, forbid: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A category per row from softmax(logits) by inverse CDF at the uniform `u` (B,); forbidden ones never."""
    probs = logits.float().masked_fill(forbid, float("-inf")).softmax(dim=1)
    cdf = probs.cumsum(dim=1)
    return (
        torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1).contiguous(), right=True)
        .squeeze(1)
        .clamp(max=len(cdf[0]) - 1)
    )


@torch.no_grad()
def sample(
    model: nn.Module, d: TableDiffusion, bank: NoiseBank, known: Known, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral DDPM sampling over `steps` of the training schedule (the posterior q(x_s | x_t, x0) between
    spaced timesteps, as diffusers' `DDPMScheduler.step`), with masked-diffusion unmasking for the
    categories; returns the numbers (B, Dn) and the category indices (B, C). Known cells come back as given."""
    device = bank.start.device
    sched = make_scheduler(d.cfg)
    sched.set_timesteps(steps)
    times = [int(t) for t in sched.timesteps]
    abar = d.alphas_cumprod.to(device)
    x0_known = d.gaussian(known.numeric, known.tokens)
    g_mask = d.gaussian_mask(known.numeric_mask, known.token_mask)
    forbid = known.forbid
    x = bank.start
    tokens = d.mask_tokens(known.tokens, ~known.token_mask) if d.masked else None
    g = d.gaussian_width
    for i, t in enumerate(times):
        a_t = abar[t]
        a_s = abar[times[i + 1]] if i + 1 < len(times) else torch.ones_like(a_t)
        noised = a_t.sqrt() * x0_known + (1 - a_t).sqrt() * bank.known_noise[i]
        x = torch.where(g_mask, noised, x)  # RePaint: known cells at their forward-noised values
        out = model(x, tokens, torch.full((len(x),), t, device=device, dtype=torch.long)).float()
        pred = out[:, :g]
        x0 = (x - (1 - a_t).sqrt() * pred) / a_t.sqrt() if d.cfg.prediction_type == "epsilon" else pred
        x0 = x0.clamp(-X0_LIMIT, X0_LIMIT)
        alpha = a_t / a_s
        mean = (a_s.sqrt() * (1 - alpha) * x0 + alpha.sqrt() * (1 - a_s) * x) / (1 - a_t)
        sigma = ((1 - alpha) * (1 - a_s) / (1 - a_t)).clamp(min=0).sqrt()
        x = mean + (sigma * bank.noise[i] if i + 1 < len(times) else 0)
        if tokens is not None:
            tokens = _unmask(d, out, tokens, forbid, (a_s - a_t) / (1 - a_t), bank.unmask[i], bank.pick[i])
    x = torch.where(g_mask, x0_known, x)
    numeric = x[:, : d.numeric_width]
    if tokens is None:
        tokens = _argmax(d, x[:, d.numeric_width :], forbid)
    return numeric, torch.where(known.token_mask, known.tokens, tokens)


def _unmask(
    d: TableDiffusion,
    out: torch.Tensor,
    tokens: torch.Tensor,
    forbid: torch.Tensor,
    share: torch.Tensor,
    unmask_u: torch.Tensor,
    pick_u: torch.Tensor,
) -> torch.Tensor:
    """One reverse step of masked diffusion: each masked cell is revealed with probability `share`."""
    logits = _split(out, d.gaussian_width, d.sizes)
    bans = torch.split(forbid, d.sizes, dim=1)
    new = tokens.clone()
    for j, size in enumerate(d.sizes):
        reveal = (tokens[:, j] == size) & (unmask_u[:, j] < share)
        new[:, j] = torch.where(reveal, _pick(logits[j], bans[j], pick_u[:, j]), tokens[:, j])
    return new


def _argmax(d: TableDiffusion, x: torch.Tensor, forbid: torch.Tensor) -> torch.Tensor:
    """ "onehot" mode: each column's category is the largest of its one-hot slots (forbidden ones excluded)."""
    cols = [
        part.masked_fill(ban, float("-inf")).argmax(dim=1)
        for part, ban in zip(torch.split(x, d.sizes, dim=1), torch.split(forbid, d.sizes, dim=1), strict=True)
    ]
    return torch.stack(cols, dim=1) if cols else torch.zeros(len(x), 0, dtype=torch.long, device=x.device)
