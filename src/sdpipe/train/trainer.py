"""The trainer every model kind shares: one loop over named parts, each tested alone.

A kind of model brings a `Task` (what trains, how a batch is drawn from the run's generator, what the loss
is); the trainer brings the rest, the same for all: `StepRunner` (forward, backward, clipping, the global
batch's loss), `NonFinitePolicy` (skip a non-finite step, roll back after too many), `Checkpointer`
(`TrainState` saved when due, restored on resume and rollback), validation with `EarlyStopping`, and
`MetricsLog` (metrics.jsonl) with trackers. All randomness comes from one CPU `torch.Generator`, drawn in a
fixed order, so a run resumed from a checkpoint ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import torch
import torch.distributed as dist
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn

from sdpipe.config import TrainConfig
from sdpipe.train.checkpoint import latest_checkpoint, load_checkpoint
from sdpipe.train.interrupt import StopSignals, TrainingInterrupted
from sdpipe.train.losses import UncertaintyWeighting
from sdpipe.train.metrics import MetricsLog, event_rows, read_metrics, rows_up_to
from sdpipe.train.run_dir import check_same_training, write_run_config
from sdpipe.train.state import Sampler, TrainState, apply_rollbacks, roll_back
from sdpipe.train.trackers import finish_trackers, start_trackers
from sdpipe.train.validation import EarlyStopping

# Test hook, not a user setting: called with each step number; True makes that step's loss NaN.
NONFINITE_HOOK: Callable[[int], bool] | None = None


class Task(Protocol):
    """What one kind of model brings to the trainer."""

    @property
    def module(self) -> nn.Module:
        """The network that trains (unwrapped); the trainer wraps it for accelerate."""

    @property
    def sampler(self) -> Sampler:
        """Which samples each step trains on, drawn from the run's generator."""

    @property
    def weighting(self) -> UncertaintyWeighting | None:
        """A learned loss weighting that trains beside the network, if any."""

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the optimizer and the EMA update, by name (all of them, or a LoRA's)."""

    def draw(self, gen: torch.Generator, rank: int, world: int, device: torch.device) -> Any:
        """This process's slice of the next global batch, on `device`. The whole batch's random numbers are
        drawn from `gen` in a fixed order whatever `world` is, so N processes train what one would."""

    def loss(self, objective: Any, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective to minimize and the plain denoising loss; `objective` is the task's loss or its
        learned weighting, as prepared by accelerate."""

    def validator(self) -> Callable[[nn.Module], float] | None:
        """The deterministic validation loss of a model, or None when the run does not validate."""


def objective_and_plain(
    objective: Any, loss_fn: Any, model: nn.Module, batch: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """A diffusion task's `Task.loss`: the objective (the learned weighting, or the plain loss when there is
    none) and the plain loss, for logging."""
    out = (objective or loss_fn)(model, *batch)
    return out if isinstance(out, tuple) else (out, out.detach())


def validation_split(validation: Any, cfg: TrainConfig) -> Any:
    """The validation split when the run validates (None otherwise); an empty one is refused, saying what to do."""
    if validation is None or cfg.validate_every is None:
        return None
    if len(validation) == 0:
        raise ValueError(
            "train.validate_every is set but the validation split is empty; raise data.validation_fraction"
        )
    return validation


@dataclass
class TrainOutcome:
    module: nn.Module  # a copy of the network with the EMA (or best validation's) weights, in eval mode
    history: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    best_step: int | None = None
    stopped_early: bool = False


class StepRunner:
    """One training step's arithmetic: loss, backward, gradient clipping, the global batch's mean losses."""

    def __init__(self, task: Task, objective: Any, model: nn.Module, params: list[nn.Parameter], acc: Accelerator):
        self.task, self.objective, self.model, self.params, self.acc = task, objective, model, params, acc

    def __call__(self, batch: Any, step: int, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, plain = self.task.loss(self.objective, self.model, batch)
        if NONFINITE_HOOK is not None and NONFINITE_HOOK(step):
            loss = loss * float("nan")
        self.acc.backward(loss)
        grad_norm = self.acc.clip_grad_norm_(self.params, grad_clip)
        loss, plain = (self.acc.reduce(v.detach(), "mean") for v in (loss, plain))
        return loss, plain, torch.as_tensor(grad_norm)


@dataclass
class NonFinitePolicy:
    """A non-finite loss or gradient skips the step (it is not an optimizer step); after `max_bad_steps` in a
    row the run rolls back to its last checkpoint at a lower learning rate (`sdpipe.train.state.roll_back`)."""

    max_bad_steps: int
    bad_in_a_row: int = 0

    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> str:
        """ "ok", "skip" or "roll_back" for a step with this loss and gradient norm."""
        if bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm)):
            self.bad_in_a_row = 0
            return "ok"
        self.bad_in_a_row += 1
        if self.bad_in_a_row < self.max_bad_steps:
            return "skip"
        self.bad_in_a_row = 0
        return "roll_back"


@dataclass
class Checkpointer:
    """When checkpoints are written (every `checkpoint_every` steps, the last step, a new best validation
    and an early stop) and how a run resumes from its latest one."""

    run_dir: Path
    cfg: TrainConfig
    state: TrainState
    config: dict  # the run's config, stored in each checkpoint and compared on resume

    def due(self, step: int, best: bool) -> bool:
        return step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps or best

    def resume(self) -> tuple[int, list[dict]]:
        """Restore the last checkpoint, if any, at the rate its recorded rollbacks leave; returns the step to
        continue from and the metrics rows up to that checkpoint (those of lost steps go)."""
        found = latest_checkpoint(self.run_dir)
        if found is None:
            return 1, []
        ck = load_checkpoint(found)
        check_same_training(ck.state.get("config", {}), self.config, found)
        step = self.state.restore(ck)
        rows = rows_up_to(read_metrics(self.run_dir / "metrics.jsonl"), step)
        apply_rollbacks(self.state, self.cfg, event_rows(rows), step)
        return step + 1, rows


class Trainer:
    """Trains `task.module` as `cfg` (the run's `train` section) says; `config` is the whole run config."""

    def __init__(
        self,
        cfg: TrainConfig,
        config: dict,
        run_dir: Path,
        task: Task,
        accelerator: Accelerator,
        gen: torch.Generator,
    ) -> None:
        self.cfg, self.config, self.run_dir, self.task = cfg, config, run_dir, task
        self.acc, self.gen = accelerator, gen
        named = task.trainable()
        self.params = [p for _, p in named]  # listed once: walking the module tree each step costs ~1 % of it
        extra = list(task.weighting.parameters()) if task.weighting is not None else []
        self.trained_params = self.params + extra
        # PyTorch's fused AdamW kernel (CPU and CUDA) steps a small UNet in ~2 ms on 2 CPU cores against ~9 ms
        # for the default per-tensor loop: ~5 % of a training step. Runs stay deterministic.
        self.optimizer = torch.optim.AdamW(
            self.trained_params,
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            fused=True if accelerator.device.type in ("cpu", "cuda") else None,
        )
        self.lr_sched = get_scheduler(
            cfg.lr_schedule if cfg.lr_schedule == "cosine" else "constant_with_warmup",
            self.optimizer,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=cfg.steps,
        )
        self.model, self.optimizer = accelerator.prepare(task.module, self.optimizer)
        self.objective = None if task.weighting is None else accelerator.prepare(task.weighting)
        # foreach: one fused update instead of a Python loop over ~150 tensors (2.5 -> 0.9 ms a step here)
        self.ema = EMAModel(
            self.params, decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_warmup_power, foreach=True
        )
        self.stopper = EarlyStopping(cfg.early_stopping_patience)
        self.state = TrainState(
            task.module, self.ema, self.optimizer, self.lr_sched, gen, task.sampler, self.stopper, task.weighting,
            trainable=[n for n, _ in named],
        )  # fmt: skip
        self.checkpoints = Checkpointer(run_dir, cfg, self.state, config)
        self.runner = StepRunner(task, self.objective, self.model, self.trained_params, accelerator)
        self.policy = NonFinitePolicy(cfg.max_bad_steps)
        check = task.validator()
        self.validate = None if check is None or cfg.validate_every is None else (lambda: self.with_ema(check))
        self.step = 0  # the step in progress while `run` trains

    def with_ema(self, fn: Callable[[nn.Module], Any]) -> Any:
        """`fn(module)` with the EMA weights swapped in and the module in eval mode; the training state is put
        back after."""
        module, params = self.task.module, self.params
        self.ema.store(params)
        self.ema.copy_to(params)
        was_training = module.training
        module.eval()
        try:
            return fn(module)
        finally:
            module.train(was_training)
            self.ema.restore(params)

    def run(
        self,
        resume: bool = False,
        progress: Callable[[int, dict], None] | None = None,
        evaluator: Callable[[Any], dict] | None = None,
        eval_every: int | None = None,
    ) -> TrainOutcome:
        """Train; `evaluator(module)` runs on the EMA weights every `eval_every` steps (None: `train.eval_every`),
        its dict logged as an `evaluation` event; `self.step` is the step it is called at."""
        cfg, acc, task = self.cfg, self.acc, self.task
        every = eval_every or cfg.eval_every
        first_step, rows = self.checkpoints.resume() if resume else (1, [])
        acc.wait_for_everyone()  # every process has checked and read the folder before one writes to it
        if acc.is_main_process:
            write_run_config(self.run_dir, self.config)
        start_trackers(acc, self.config)
        # a base loaded from disk is in eval mode, where dropout (a LoRA's included) does nothing
        task.module.train()
        start = time.perf_counter()
        with StopSignals() as stop, _metrics_file(self.run_dir, acc.is_main_process) as file:
            log = MetricsLog(file, rows)
            step = first_step
            while step <= cfg.steps and not self.stopper.should_stop:
                self.step = step
                batch = task.draw(self.gen, acc.process_index, acc.num_processes, acc.device)
                loss, plain, grad_norm = self.runner(batch, step, cfg.grad_clip)
                verdict = self.policy.judge(loss, grad_norm)
                if verdict != "ok":
                    self.optimizer.zero_grad(set_to_none=True)
                    if verdict == "skip":
                        bad = self.policy.bad_in_a_row
                        log.add({"step": step, "event": "nonfinite_step_skipped", "consecutive": bad})
                        continue
                    event = roll_back(self.run_dir, cfg, log.events, self.state)
                    log.roll_back(event)
                    step = event["to_step"] + 1
                    continue
                self.optimizer.step()
                self.lr_sched.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.step(self.params)
                elapsed = time.perf_counter() - start
                row = {
                    "step": step,
                    "loss": loss.item(),
                    "denoising_loss": plain.item(),
                    "lr": self.lr_sched.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "samples_per_s": (step - first_step + 1) * cfg.batch_size / elapsed,
                    "elapsed_s": elapsed,
                }
                log.add(row)
                acc.log({k: v for k, v in row.items() if k != "step"}, step=step)
                is_best = self._validate(step, log)
                if evaluator is not None and every and step % every == 0:
                    scores = self.with_ema(evaluator)
                    log.add({"step": step, "event": "evaluation", **scores})
                    acc.log(scores, step=step)
                saved = None
                if acc.is_main_process and (self.checkpoints.due(step, is_best) or self.stopper.should_stop):
                    file.flush()
                    saved = self.state.save(self.run_dir, step, self.config, best=is_best)
                if step % cfg.checkpoint_every == 0 or is_best:
                    acc.wait_for_everyone()  # no process rolls back to a checkpoint still being written
                if progress is not None:
                    progress(step, row)
                signum = _stop_signal(stop, acc)
                if signum is not None:
                    raise self._interrupted(signum, step, saved, file)
                step += 1
        acc.wait_for_everyone()
        finish_trackers(acc)
        seconds = time.perf_counter() - start
        return self._outcome(log, seconds, (step - first_step) * cfg.batch_size)

    def _validate(self, step: int, log: MetricsLog) -> bool:
        """Validate when due; True when this step's weights are the best so far."""
        if self.validate is None or step % (self.cfg.validate_every or 1):
            return False
        value = self.validate()
        is_best = self.stopper.update(step, value)
        log.add({"step": step, "event": "validation", "val_loss": value, "best": is_best})
        self.acc.log({"val_loss": value}, step=step)
        return is_best

    def _outcome(self, log: MetricsLog, seconds: float, trained: int) -> TrainOutcome:
        """A copy of the module with the best validation's EMA weights, or the final EMA weights."""
        final = copy.deepcopy(self.task.module)
        best = latest_checkpoint(self.run_dir, "best") if self.validate is not None else None
        if best is not None:
            final.load_state_dict(load_checkpoint(best).ema, strict=False)
        else:
            names = dict(final.named_parameters())
            for name, shadow in zip(self.state.trainable, self.ema.shadow_params, strict=True):
                names[name].data.copy_(shadow)
        final.eval().requires_grad_(False)
        history = log.history
        if not all(math.isfinite(r["loss"]) for r in history[-10:]):
            raise FloatingPointError("training diverged: the last losses are not finite; lower train.learning_rate")
        return TrainOutcome(
            final,
            history,
            log.events,
            seconds,
            trained / seconds if seconds > 0 else 0.0,
            best_step=self.stopper.best_step if best is not None else None,
            stopped_early=self.stopper.should_stop,
        )

    def _interrupted(self, signum: int, step: int, saved: Path | None, file: IO[str]) -> TrainingInterrupted:
        """Checkpoint `step` (unless it just was) and say where the run stopped."""
        if self.acc.is_main_process and saved is None:
            file.flush()
            saved = self.state.save(self.run_dir, step, self.config)
        self.acc.wait_for_everyone()
        finish_trackers(self.acc)
        return TrainingInterrupted(signum, step, self.cfg.steps, self.run_dir, saved)


def _metrics_file(run_dir: Path, main: bool) -> IO[str]:
    return (run_dir / "metrics.jsonl").open("w") if main else open(os.devnull, "w")


def _stop_signal(stop: StopSignals, accelerator: Accelerator) -> int | None:
    """The signal that asks the run to stop, agreed by all processes (each may have got it a step apart)."""
    if accelerator.num_processes == 1:
        return stop.signum
    flag = torch.tensor([stop.signum or 0], device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None
