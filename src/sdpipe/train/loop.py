"""Training a pixel-space model: class-conditional denoising with label dropout (for classifier-free
guidance, Ho & Salimans 2022), AdamW, warmup + cosine LR, gradient clipping and an EMA of the weights.

`PixelTask` is what this kind brings to the shared `sdpipe.train.trainer.Trainer`: the UNet, the batches
and the loss. Devices, mixed precision and multi-process wrapping come from `accelerate`. All randomness of
a run (data order, noise, timesteps, label dropout) comes from one `torch.Generator` seeded by
`train.seed`, so two runs of the same config on the same machine and thread count give bitwise identical
weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.models.unets.unet_2d import UNet2DModel
from torch import nn

from sdpipe.config import PipelineConfig, TrainConfig
from sdpipe.data import ImageSet
from sdpipe.models import build_unet
from sdpipe.train.interrupt import TrainingInterrupted
from sdpipe.train.losses import UncertaintyWeighting
from sdpipe.train.recipe import LevelSampler, Loss, make_objective, time_embedding_max_frequency
from sdpipe.train.run_dir import check_new_run
from sdpipe.train.state import EpochSampler
from sdpipe.train.trackers import accelerator_tracking
from sdpipe.train.trainer import Trainer, objective_and_plain, validation_split
from sdpipe.train.validation import validation_loss

__all__ = ["EpochSampler", "PixelTask", "TrainResult", "TrainingInterrupted", "train"]


@dataclass
class TrainResult:
    unet: UNet2DModel  # the EMA weights, in eval mode
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    events: list[dict] = field(default_factory=list)  # skipped non-finite steps, rollbacks, validations
    best_step: int | None = None  # with validation: the step whose EMA weights `unet` holds
    stopped_early: bool = False


def start_run(t_cfg: TrainConfig, run_dir: Path, resume: bool) -> tuple[Accelerator, torch.Generator]:
    """Check the run folder, set threads and seeds, and start accelerate (shared by every kind of model): the
    run's `train` section in, the accelerator and the run's one generator out."""
    if not resume:
        check_new_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if t_cfg.threads:
        torch.set_num_threads(t_cfg.threads)
    torch.manual_seed(t_cfg.seed)
    # On a machine without CUDA, cpu=True lets accelerate run several CPU processes (torchrun, accelerate
    # launch) over gloo; with CUDA it places each process on its GPU.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=t_cfg.mixed_precision,
        **accelerator_tracking(t_cfg.trackers, run_dir),
    )
    if t_cfg.batch_size % accelerator.num_processes:
        raise ValueError(
            f"train.batch_size {t_cfg.batch_size} must be divisible by the {accelerator.num_processes} processes"
        )
    return accelerator, torch.Generator().manual_seed(t_cfg.seed)


def train(
    cfg: PipelineConfig,
    data: ImageSet,
    run_dir: str | Path,
    progress: Callable[[int, dict], None] | None = None,
    resume: bool = False,
    validation: ImageSet | None = None,
    evaluator: Callable[[UNet2DModel], dict] | None = None,
) -> TrainResult:
    """Train a model on `data` as `cfg` says; writes RUN/config.yaml, checkpoints and `metrics.jsonl`.

    A new run (not `resume`) refuses a folder holding another run's files (`sdpipe.train.run_dir`). With
    `resume`, training continues from the run's last complete checkpoint (if it has one) with every
    state restored, so it ends with the weights an uninterrupted run would have had (same machine and
    thread count). With `validation` data and `train.validate_every`, the validation loss of the EMA weights
    is logged, the best validation's checkpoint is kept, training may stop early, and the returned model is
    the best one. With an `evaluator` and `train.eval_every`, it is called on the EMA weights (in eval mode)
    every that many steps and its numbers are logged as `evaluation` events. SIGINT or SIGTERM stops the run
    at the next step boundary with a checkpoint, raising `TrainingInterrupted`."""
    run_dir = Path(run_dir)
    accelerator, gen = start_run(cfg.train, run_dir, resume)
    task = PixelTask(cfg, data, gen, validation)
    trainer = Trainer(cfg.train, cfg.model_dump(mode="json"), run_dir, task, accelerator, gen)
    out = trainer.run(resume, progress, evaluator)
    unet = out.module
    assert isinstance(unet, UNet2DModel)
    return TrainResult(
        unet, out.history, out.seconds, out.samples_per_second, out.events, out.best_step, out.stopped_early
    )


class PixelTask:
    """A class-conditional (or unconditional) `UNet2DModel` on images in [-1, 1], with label dropout.

    Draw order from the run's generator, kept since wave one so resume stays bitwise: indices, the images'
    random crops/flips (`ImageSet.batch`), label dropout, noise, noise levels."""

    def __init__(
        self, cfg: PipelineConfig, data: ImageSet, gen: torch.Generator, validation: ImageSet | None = None
    ) -> None:
        self.cfg, self.data, self.validation = cfg, data, validation
        self.num_classes = len(data.class_names) if data.class_names else None  # None: an unconditional model
        channels, _, size = data.image_shape
        self.module = build_unet(
            cfg.model,
            sample_size=size,
            channels=channels,
            num_classes=self.num_classes,
            max_time_frequency=time_embedding_max_frequency(cfg),
        )
        if cfg.train.gradient_checkpointing:
            self.module.enable_gradient_checkpointing()
        self.loss_fn: Loss
        self.noise_levels: LevelSampler
        self.loss_fn, self.noise_levels = make_objective(cfg)
        # what the optimizer minimizes: the loss, or the loss with EDM2's learned weighting, whose few weights
        # train beside the UNet's (and are checkpointed with them); validation always reports the plain loss
        self.weighting = UncertaintyWeighting(self.loss_fn) if cfg.train.uncertainty_weighting else None
        self.sampler = EpochSampler(len(data), cfg.train.batch_size, gen)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.module.named_parameters())

    def draw(self, gen: torch.Generator, rank: int, world: int, device: torch.device) -> tuple[Any, ...]:
        # every process draws the same global batch and trains on its own slice of it, so N processes train
        # the model one process would (gradients are averaged over equal slices); each reads only its
        # slice's files, with the random crops/flips the whole batch would have had
        idx = self.sampler.next()
        x0, y = self.data.batch(idx, gen, select=slice(rank, None, world))
        dropped = torch.rand(len(idx), generator=gen) < self.cfg.train.label_dropout
        noise = torch.randn((len(idx), *self.data.image_shape), generator=gen)
        t = self.noise_levels(len(idx), gen)
        dropped, noise, t = (v[rank::world] for v in (dropped, noise, t))
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        labels = None if self.num_classes is None else y.masked_fill(dropped, self.num_classes).to(device)
        return x0, labels, noise, t

    def loss(self, objective: Any, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return objective_and_plain(objective, self.loss_fn, model, batch)

    def validator(self) -> Callable[[nn.Module], float] | None:
        """The validation loss of a model on the validation split. The validation images are read once (with
        preprocessing drawn from a fixed seed) and kept."""
        cfg = self.cfg
        validation = validation_split(self.validation, cfg.train)
        if validation is None:
            return None
        x_val, y = validation.batch(torch.arange(len(validation)), torch.Generator().manual_seed(cfg.train.seed))
        y_val = y if validation.class_names else None

        def run(model: nn.Module) -> float:
            device = next(model.parameters()).device
            labels = None if y_val is None else y_val.to(device)
            return validation_loss(model, self.loss_fn, x_val.to(device), labels, seed=cfg.train.seed)

        return run
