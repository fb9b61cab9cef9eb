"""The denoiser of a table diffusion model: an MLP in the style of TabDDPM (Kotelnikov et al. 2023,
"TabDDPM: Modelling Tabular Data with Diffusion Models", `MLPDiffusion`).

In: the noisy Gaussian block (B, G) (the numbers, plus the +-1 one-hot categories in "onehot" mode), the
category tokens (B, C) in "masked" mode (index `size` of a column is its MASK), and the timestep (B,).
Out: (B, G + L): the Gaussian block's prediction (noise or clean values), then, in "masked" mode, the
concatenated per-column category logits (L = sum of the sizes). A diffusers `ModelMixin` + `ConfigMixin`,
so `save_pretrained` / `from_pretrained` store it as config.json + safetensors.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class TableDenoiser(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """x_t, tokens, t -> the Gaussian block's prediction and the category logits (module docstring)."""

    @register_to_config
    def __init__(
        self,
        numeric_width: int,
        category_sizes: list[int],
        categorical: str = "masked",
        width: int = 256,
        depth: int = 3,
        time_embedding: int = 128,
        category_embedding: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if categorical not in ("masked", "onehot"):
            raise ValueError(f"categorical must be 'masked' or 'onehot', not {categorical!r}")
        sizes = [int(s) for s in category_sizes]
        masked = categorical == "masked"
        self.gaussian_width = numeric_width + (0 if masked else sum(sizes))
        self.logit_width = sum(sizes) if masked else 0
        # one embedding table per category column, its last row the MASK token
        self.embeddings = nn.ModuleList(nn.Embedding(s + 1, category_embedding) for s in sizes) if masked else None
        in_width = self.gaussian_width + (len(sizes) * category_embedding if masked else 0)
        self.time_proj = Timesteps(time_embedding, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(time_embedding, width)
        self.proj = nn.Linear(max(in_width, 1), width)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, self.gaussian_width + self.logit_width))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        parts = [x]
        if self.embeddings is not None and tokens is not None:
            parts += [emb(tokens[:, j]) for j, emb in enumerate(self.embeddings)]
        h = torch.cat(parts, dim=1)
        if h.shape[1] == 0:  # a table with nothing to model still runs (its input is one zero)
            h = x.new_zeros(len(x), 1)
        temb = self.time_embed(self.time_proj(t).to(h.dtype))
        return self.out(self.body(self.proj(h) + temb))
