"""The state of a run in progress, as checkpoints hold it, and the rollback of a diverging run.

Restoring puts every tensor on the device of the model's parameter it belongs to (EMA shadows, optimizer
state, the learned loss weighting), so a run resumed or rolled back on a GPU keeps training on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers.training_utils import EMAModel
from torch import nn

from sdpipe.config import TrainConfig
from sdpipe.train.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from sdpipe.train.losses import UncertaintyWeighting
from sdpipe.train.validation import EarlyStopping


class Sampler(Protocol):
    """Which samples each step trains on; its state is checkpointed (tensors and plain values)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EpochSampler:
    """Batches of indices from a fresh permutation each epoch, drawn from the run's generator."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator) -> None:
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self.order = torch.randperm(n, generator=gen)
        self.pos = 0

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            if self.pos == self.n:
                self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
            take = self.order[self.pos : self.pos + need]
            parts.append(take)
            self.pos += len(take)
            need -= len(take)
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.pos = state["order"], int(state["pos"])


@dataclass
class TrainState:
    """Everything a checkpoint holds about a run in progress (besides its config)."""

    unet: nn.Module  # the network that trains, unwrapped from any DDP wrapper
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator  # on the CPU by design: a run draws the same numbers on every device
    batches: Sampler
    stopper: EarlyStopping
    weighting: UncertaintyWeighting | None = None
    # the names of the parameters that train, in the EMA's order; empty = all of the network's. When only
    # some train (a LoRA), checkpoints hold just those: the rest is the base model, loaded again on resume.
    trainable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.partial = bool(self.trainable) and len(self.trainable) < len(list(self.unet.parameters()))
        if not self.trainable:
            self.trainable = [n for n, _ in self.unet.named_parameters()]

    def _model_state(self) -> dict[str, torch.Tensor]:
        if not self.partial:
            return self.unet.state_dict()
        params = dict(self.unet.named_parameters())
        return {n: params[n] for n in self.trainable}

    def save(self, run_dir: Path, step: int, config: dict, best: bool = False) -> Path:
        sampler = self.batches.state_dict()
        tensors = {f"sampler.{k}": v for k, v in sampler.items() if isinstance(v, torch.Tensor)}
        return save_checkpoint(
            run_dir,
            step,
            model=self._model_state(),
            ema=dict(zip(self.trainable, self.ema.shadow_params, strict=True)),
            optimizer=self.optimizer.state_dict(),
            rng={"generator": self.gen.get_state(), "torch": torch.get_rng_state(), **tensors},
            state={
                "sampler": {k: v for k, v in sampler.items() if not isinstance(v, torch.Tensor)},
                "ema_optimization_step": self.ema.optimization_step,
                "lr_scheduler": self.lr_sched.state_dict(),
                "early_stopping": dataclasses.asdict(self.stopper),
                "config": config,
            },
            loss_weighting=None if self.weighting is None else self.weighting.state_dict(),
            keep=config["train"]["keep_checkpoints"],
            best=best,
        )

    def restore(self, ck: Checkpoint) -> int:
        """Put every piece of training state back as the checkpoint holds it, on the model's devices;
        returns its step. (`load_state_dict` copies into the tensors in place, and the optimizer's moves its
        state to each parameter's device itself.)"""
        self.unet.load_state_dict(ck.model, strict=not self.partial)
        if self.weighting is not None:
            self.weighting.load_state_dict(ck.loss_weighting)
        params = dict(self.unet.named_parameters())
        self.ema.shadow_params = [ck.ema[n].to(params[n].device, copy=True) for n in self.trainable]
        self.ema.optimization_step = ck.state["ema_optimization_step"]
        self.optimizer.load_state_dict(ck.optimizer)
        self.lr_sched.load_state_dict(ck.state["lr_scheduler"])
        self.gen.set_state(ck.rng["generator"])
        torch.set_rng_state(ck.rng["torch"])
        sampler = {k.removeprefix("sampler."): v for k, v in ck.rng.items() if k.startswith("sampler.")}
        self.batches.load_state_dict(sampler | ck.state["sampler"])
        for key, value in ck.state.get("early_stopping", {}).items():
            setattr(self.stopper, key, value)
        return ck.step

    def scale_learning_rate(self, scale: float) -> None:
        """Multiply the schedule's base rates (and so the current ones) by `scale`."""
        sched = self.lr_sched
        sched.base_lrs = [lr * scale for lr in sched.base_lrs]
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * factor(sched.last_epoch)


def rollbacks_to(events: list[dict], step: int) -> int:
    """How many rollbacks to the checkpoint of `step` the events record."""
    return sum(e["event"] == "rollback" and e["to_step"] == step for e in events)


def apply_rollbacks(state: TrainState, t_cfg: TrainConfig, events: list[dict], step: int) -> None:
    """After restoring the checkpoint of `step`: its k-th rollback trains at its rate x factor^k (so a
    divergence that repeats meets an ever lower rate); with k = 0, the checkpoint's own rate."""
    k = rollbacks_to(events, step)
    if k:
        state.scale_learning_rate(t_cfg.rollback_lr_factor**k)


def roll_back(run_dir: Path, t_cfg: TrainConfig, events: list[dict], state: TrainState) -> dict:
    """Restore the last good checkpoint, at its rate x train.rollback_lr_factor^k for its k-th rollback;
    returns the rollback event (to log). Gives up with a clear error when there is nothing (left) to roll
    back to."""
    rollbacks = sum(e["event"] == "rollback" for e in events)
    path = latest_checkpoint(run_dir)
    if path is None or rollbacks >= t_cfg.max_rollbacks:
        why = "no checkpoint to roll back to" if path is None else f"{rollbacks} rollbacks did not help"
        raise FloatingPointError(
            f"training diverged: {t_cfg.max_bad_steps} non-finite steps in a row and {why}; "
            "lower train.learning_rate or checkpoint more often (train.checkpoint_every)"
        )
    step = state.restore(load_checkpoint(path))
    k = rollbacks_to(events, step) + 1
    event = {"step": step, "event": "rollback", "to_step": step, "rollback_to_this_step": k}
    apply_rollbacks(state, t_cfg, [*events, event], step)
    return event | {"lr_scale": state.lr_sched.base_lrs[0] / t_cfg.learning_rate}
