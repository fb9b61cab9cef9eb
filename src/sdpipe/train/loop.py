"""The training loop: class-conditional denoising with label dropout (for classifier-free guidance,
Ho & Salimans 2022), AdamW, warmup + cosine LR, gradient clipping and an EMA of the weights.

Devices, mixed precision and multi-process wrapping come from `accelerate`. All randomness of a run
(data order, noise, timesteps, label dropout) comes from one `torch.Generator` seeded by `train.seed`, so
two runs of the same config on the same machine and thread count give bitwise identical weights.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from sdpipe.config import PipelineConfig, TrainConfig
from sdpipe.data import ImageSet
from sdpipe.models import build_unet
from sdpipe.train.checkpoint import latest_checkpoint, load_checkpoint
from sdpipe.train.interrupt import StopSignals, TrainingInterrupted
from sdpipe.train.losses import UncertaintyWeighting
from sdpipe.train.metrics import MetricsLog, event_rows, read_metrics, rows_up_to
from sdpipe.train.recipe import Loss, make_objective, time_embedding_max_frequency
from sdpipe.train.run_dir import check_new_run, check_same_training, write_run_config
from sdpipe.train.state import EpochSampler, TrainState, apply_rollbacks, roll_back
from sdpipe.train.trackers import accelerator_tracking, finish_trackers, start_trackers
from sdpipe.train.validation import EarlyStopping, validation_loss

__all__ = ["EpochSampler", "TrainResult", "TrainingInterrupted", "train"]

T = TypeVar("T")

# Test hook, not a user setting: called with each step number; True makes that step's loss NaN.
NONFINITE_HOOK: Callable[[int], bool] | None = None


@dataclass
class TrainResult:
    unet: UNet2DModel  # the EMA weights, in eval mode
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    events: list[dict] = field(default_factory=list)  # skipped non-finite steps, rollbacks, validations
    best_step: int | None = None  # with validation: the step whose EMA weights `unet` holds
    stopped_early: bool = False


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
    t_cfg = cfg.train
    run_dir = Path(run_dir)
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
    rank, world = accelerator.process_index, accelerator.num_processes
    if t_cfg.batch_size % world:
        raise ValueError(f"train.batch_size {t_cfg.batch_size} must be divisible by the {world} processes")
    gen = torch.Generator().manual_seed(t_cfg.seed)

    num_classes = len(data.class_names) if data.class_names else None  # None: an unconditional model
    channels, _, size = data.image_shape
    unet = build_unet(
        cfg.model,
        sample_size=size,
        channels=channels,
        num_classes=num_classes,
        max_time_frequency=time_embedding_max_frequency(cfg),
    )
    if t_cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    loss_fn, noise_levels = make_objective(cfg)
    # what the optimizer minimizes: the loss, or the loss with EDM2's learned weighting, whose few weights train
    # beside the UNet's (and are checkpointed with them); validation always reports the plain loss
    weighting = UncertaintyWeighting(loss_fn) if t_cfg.uncertainty_weighting else None
    params = list(unet.parameters())  # listed once: walking the module tree each step costs ~1 % of it
    trained_params = params + (list(weighting.parameters()) if weighting is not None else [])
    # PyTorch's fused AdamW kernel (CPU and CUDA) steps this UNet in ~2 ms on 2 CPU cores against ~9 ms for the
    # default per-tensor loop: ~5 % of a training step. Runs stay deterministic; other devices use the default.
    optimizer = torch.optim.AdamW(
        trained_params,
        lr=t_cfg.learning_rate,
        weight_decay=t_cfg.weight_decay,
        fused=True if accelerator.device.type in ("cpu", "cuda") else None,
    )
    lr_sched = get_scheduler(
        t_cfg.lr_schedule if t_cfg.lr_schedule == "cosine" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=t_cfg.warmup_steps,
        num_training_steps=t_cfg.steps,
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    objective = loss_fn if weighting is None else accelerator.prepare(weighting)  # DDP too, if multi-process
    # foreach: one fused update instead of a Python loop over ~150 tensors (2.5 -> 0.9 ms a step here)
    ema = EMAModel(params, decay=t_cfg.ema_decay, use_ema_warmup=True, power=t_cfg.ema_warmup_power, foreach=True)

    batches = EpochSampler(len(data), t_cfg.batch_size, gen)
    validate = _validator(cfg, validation, loss_fn, accelerator.unwrap_model(unet), ema)
    stopper = EarlyStopping(t_cfg.early_stopping_patience)
    config = cfg.model_dump(mode="json")
    state = TrainState(accelerator.unwrap_model(unet), ema, optimizer, lr_sched, gen, batches, stopper, weighting)
    first_step, rows = _resume(run_dir, config, state, t_cfg) if resume else (1, [])
    accelerator.wait_for_everyone()  # every process has checked and read the folder before one writes to it
    if accelerator.is_main_process:
        write_run_config(run_dir, config)
    start_trackers(accelerator, config)
    bad_in_a_row = 0
    start = time.perf_counter()
    # only the main process writes files; the others log to nowhere
    with StopSignals() as stop, _metrics_file(run_dir, accelerator.is_main_process) as file:
        log = MetricsLog(file, rows)
        step = first_step
        while step <= t_cfg.steps and not stopper.should_stop:
            # every process draws the same global batch and trains on its own slice of it, so N processes
            # train the model one process would (gradients are averaged over equal slices); each reads
            # only its slice's files, with the random crops/flips the whole batch would have had
            idx = batches.next()
            x0, y = data.batch(idx, gen, select=slice(rank, None, world))
            dropped = torch.rand(len(idx), generator=gen) < t_cfg.label_dropout
            noise = torch.randn((len(idx), *data.image_shape), generator=gen)
            t = noise_levels(len(idx), gen)
            dropped, noise, t = (v[rank::world] for v in (dropped, noise, t))
            x0, noise, t = x0.to(accelerator.device), noise.to(accelerator.device), t.to(accelerator.device)
            labels = None if num_classes is None else y.masked_fill(dropped, num_classes).to(x0.device)
            loss, plain = _losses(objective, unet, x0, labels, noise, t)
            if NONFINITE_HOOK is not None and NONFINITE_HOOK(step):
                loss = loss * float("nan")
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(trained_params, t_cfg.grad_clip)
            # the global batch's losses, the same on every process
            loss, plain = (accelerator.reduce(v.detach(), "mean") for v in (loss, plain))
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                # NaN/Inf policy: skip the step (it is not counted as an optimizer step); after
                # train.max_bad_steps in a row, roll back to the last checkpoint with a lower learning rate
                optimizer.zero_grad(set_to_none=True)
                bad_in_a_row += 1
                if bad_in_a_row < t_cfg.max_bad_steps:
                    log.add({"step": step, "event": "nonfinite_step_skipped", "consecutive": bad_in_a_row})
                    continue
                event = roll_back(run_dir, t_cfg, log.events, state)
                log.roll_back(event)
                step, bad_in_a_row = event["to_step"] + 1, 0
                continue
            bad_in_a_row = 0
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(params)
            elapsed = time.perf_counter() - start
            row = {
                "step": step,
                "loss": loss.item(),
                "denoising_loss": plain.item(),
                "lr": lr_sched.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "samples_per_s": (step - first_step + 1) * t_cfg.batch_size / elapsed,
                "elapsed_s": elapsed,
            }
            log.add(row)
            accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
            is_best = False
            if validate is not None and step % (t_cfg.validate_every or 1) == 0:
                value = validate()
                is_best = stopper.update(step, value)
                log.add({"step": step, "event": "validation", "val_loss": value, "best": is_best})
                accelerator.log({"val_loss": value}, step=step)
            if evaluator is not None and t_cfg.eval_every and step % t_cfg.eval_every == 0:
                scores = _with_ema(accelerator.unwrap_model(unet), ema, evaluator)
                log.add({"step": step, "event": "evaluation", **scores})
                accelerator.log(scores, step=step)
            checkpoint_due = step % t_cfg.checkpoint_every == 0 or step == t_cfg.steps or is_best
            saved = None
            if accelerator.is_main_process and (checkpoint_due or stopper.should_stop):
                file.flush()
                saved = state.save(run_dir, step, config, best=is_best)
            if step % t_cfg.checkpoint_every == 0 or is_best:
                accelerator.wait_for_everyone()  # no process rolls back to a checkpoint still being written
            if progress is not None:
                progress(step, row)
            signum = _stop_signal(stop, accelerator)
            if signum is not None:
                raise _interrupted(signum, step, t_cfg, run_dir, saved, state, config, accelerator, file)
            step += 1
    accelerator.wait_for_everyone()
    finish_trackers(accelerator)
    seconds = time.perf_counter() - start
    final = copy.deepcopy(accelerator.unwrap_model(unet))
    best = latest_checkpoint(run_dir, "best") if validate is not None else None
    if best is not None:  # the best validation's EMA weights
        final.load_state_dict(load_checkpoint(best).ema, strict=False)
    else:
        ema.copy_to(final.parameters())
    final.eval().requires_grad_(False)
    history = log.history
    if not all(math.isfinite(r["loss"]) for r in history[-10:]):
        raise FloatingPointError("training diverged: the last losses are not finite; lower train.learning_rate")
    trained = (step - first_step) * t_cfg.batch_size
    return TrainResult(
        final,
        history,
        seconds,
        trained / seconds if seconds > 0 else 0.0,
        log.events,
        best_step=stopper.best_step if best is not None else None,
        stopped_early=stopper.should_stop,
    )


def _resume(run_dir: Path, config: dict, state: TrainState, t_cfg: TrainConfig) -> tuple[int, list[dict]]:
    """Restore the run's last checkpoint, if it has one, at the rate its recorded rollbacks leave; returns the
    step to continue from and the metrics rows that count up to the checkpoint (those of lost steps go)."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return 1, []
    ck = load_checkpoint(found)
    check_same_training(ck.state.get("config", {}), config, found)
    step = state.restore(ck)
    rows = rows_up_to(read_metrics(run_dir / "metrics.jsonl"), step)
    apply_rollbacks(state, t_cfg, event_rows(rows), step)
    return step + 1, rows


def _metrics_file(run_dir: Path, main: bool) -> IO[str]:
    return (run_dir / "metrics.jsonl").open("w") if main else open(os.devnull, "w")


def _losses(
    objective: Any, unet: Any, x0: torch.Tensor, labels: torch.Tensor | None, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective to minimize and the plain denoising loss (the same, unless the loss learns weights)."""
    out = objective(unet, x0, labels, noise, t)
    return out if isinstance(out, tuple) else (out, out.detach())


def _stop_signal(stop: StopSignals, accelerator: Accelerator) -> int | None:
    """The signal that asks the run to stop, agreed by all processes (each may have got it a step apart)."""
    if accelerator.num_processes == 1:
        return stop.signum
    flag = torch.tensor([stop.signum or 0], device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def _interrupted(
    signum: int,
    step: int,
    t_cfg: TrainConfig,
    run_dir: Path,
    saved: Path | None,
    state: TrainState,
    config: dict,
    accelerator: Accelerator,
    file: IO[str],
) -> TrainingInterrupted:
    """Checkpoint `step` (unless it just was) and say where the run stopped."""
    if accelerator.is_main_process and saved is None:
        file.flush()
        saved = state.save(run_dir, step, config)
    accelerator.wait_for_everyone()
    finish_trackers(accelerator)
    return TrainingInterrupted(signum, step, t_cfg.steps, run_dir, saved)


def _validator(
    cfg: PipelineConfig, validation: ImageSet | None, loss_fn: Loss, unet: UNet2DModel, ema: EMAModel
) -> Callable[[], float] | None:
    """A function giving the validation loss of the EMA weights, or None when not validating. The
    validation images are read once (with preprocessing drawn from a fixed seed) and kept."""
    if validation is None or cfg.train.validate_every is None:
        return None
    if len(validation) == 0:
        raise ValueError(
            "train.validate_every is set but the validation split is empty; raise data.validation_fraction"
        )
    x_val, y = validation.batch(torch.arange(len(validation)), torch.Generator().manual_seed(cfg.train.seed))
    y_val = y if validation.class_names else None

    def run(model: UNet2DModel) -> float:
        labels = None if y_val is None else y_val.to(model.device)
        return validation_loss(model, loss_fn, x_val.to(model.device), labels, seed=cfg.train.seed)

    return lambda: _with_ema(unet, ema, run)


def _with_ema(unet: UNet2DModel, ema: EMAModel, fn: Callable[[UNet2DModel], T]) -> T:
    """`fn(unet)` with the EMA weights swapped in and the model in eval mode; the training state is put back."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    was_training = unet.training
    unet.eval()
    try:
        return fn(unet)
    finally:
        unet.train(was_training)
        ema.restore(unet.parameters())
