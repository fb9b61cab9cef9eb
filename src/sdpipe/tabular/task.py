"""What a table model brings to the shared trainer (`sdpipe.train.trainer.Task`): the denoiser, the rows each
step trains on, the loss and a deterministic validation loss.

Draw order from the run's generator, fixed so a resumed run is bitwise an uninterrupted one: row indices
(`EpochSampler`), the Gaussian noise (B, G), the timesteps (B,), the masking uniforms (B, C). The whole
global batch is drawn, then each process keeps its slice `rank::world`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sdpipe.config import TrainConfig
from sdpipe.tabular.diffusion import TableDiffusion, TableLoss
from sdpipe.tabular.model import TableDenoiser
from sdpipe.tabular.model_config import TableModelConfig
from sdpipe.tabular.preprocess import EncodedTable
from sdpipe.train.state import EpochSampler
from sdpipe.train.trainer import objective_and_plain, validation_split


class _Rows:
    """An encoded table's tensors for training: numbers, categories and their observed masks."""

    def __init__(self, table: EncodedTable) -> None:
        n = table.rows
        self.numeric, self.tokens = table.numeric.float(), table.categorical.long()
        ones = torch.ones
        no = table.numeric_observed
        co = table.categorical_observed
        self.numeric_observed = no.bool() if no is not None else ones(self.numeric.shape, dtype=torch.bool)
        self.token_observed = co.bool() if co is not None else ones(self.tokens.shape, dtype=torch.bool)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def take(self, idx: torch.Tensor) -> list[torch.Tensor]:
        return [v[idx] for v in (self.numeric, self.tokens, self.numeric_observed, self.token_observed)]


def build_denoiser(cfg: TableModelConfig, numeric_width: int, category_sizes: list[int], seed: int) -> TableDenoiser:
    """A new denoiser shaped by `cfg`, its initial weights drawn from `seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TableDenoiser(
            numeric_width,
            list(category_sizes),
            cfg.categorical,
            cfg.width,
            cfg.depth,
            cfg.time_embedding,
            cfg.category_embedding,
            cfg.dropout,
        )


class TableTask:
    """A `TableDenoiser` on an encoded table (module docstring)."""

    def __init__(
        self,
        model_cfg: TableModelConfig,
        train_cfg: TrainConfig,
        train: EncodedTable,
        gen: torch.Generator,
        validation: EncodedTable | None = None,
    ) -> None:
        if train.rows == 0:
            raise ValueError("no training rows: the encoded table is empty")
        self.train_cfg, self.validation = train_cfg, validation
        self.rows = _Rows(train)
        sizes = list(train.category_sizes)
        self.diffusion = TableDiffusion(model_cfg, int(train.numeric.shape[1]), sizes)
        self.loss_fn = TableLoss(self.diffusion)
        self.module = build_denoiser(model_cfg, self.diffusion.numeric_width, sizes, train_cfg.seed)
        self.sampler = EpochSampler(len(self.rows), train_cfg.batch_size, gen)
        self.weighting = None

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.module.named_parameters())

    def _randoms(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.diffusion
        noise = torch.randn(n, d.gaussian_width, generator=gen)
        t = torch.randint(0, d.num_timesteps, (n,), generator=gen)
        u = torch.rand(n, len(d.sizes), generator=gen)
        return noise, t, u

    def draw(self, gen: torch.Generator, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        idx = self.sampler.next()
        parts = [*self.rows.take(idx), *self._randoms(len(idx), gen)]
        return tuple(v[rank::world].to(device) for v in parts)

    def loss(self, objective: Any, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return objective_and_plain(objective, self.loss_fn, model, batch)

    def validator(self) -> Callable[[nn.Module], float] | None:
        """The loss on the validation rows at fixed noise: each row at `draws` stratified timesteps (the
        quantiles (k + offset) / draws of the schedule, one uniform offset per row, as
        `sdpipe.train.validation.validation_loss`), noise and masking from `train.seed`."""
        rows = validation_split(None if self.validation is None else _Rows(self.validation), self.train_cfg)
        if rows is None:
            return None
        draws, d = 4, self.diffusion
        gen = torch.Generator().manual_seed(self.train_cfg.seed)
        offset = torch.rand(len(rows), generator=gen, dtype=torch.float64)
        noise = torch.randn(draws, len(rows), d.gaussian_width, generator=gen)
        u = torch.rand(draws, len(rows), len(d.sizes), generator=gen)
        times = [((k + offset) / draws * d.num_timesteps).long().clamp(max=d.num_timesteps - 1) for k in range(draws)]
        data = rows.take(torch.arange(len(rows)))

        @torch.inference_mode()
        def run(model: nn.Module) -> float:
            device = next(model.parameters()).device
            on = [v.to(device) for v in data]
            total = sum(
                self.loss_fn(model, *on, noise[k].to(device), times[k].to(device), u[k].to(device)).item()
                for k in range(draws)
            )
            return total / draws

        return run
