"""`sdpipe train` for text-to-image configs (`model.type: text-to-image`): validated captioned data ->
(a scratch run without `model.pretrained`: its own VAE and text encoder, `train.components`) -> caches -> the
shared trainer -> RUN/model (and RUN/lora.safetensors) -> RUN/training.json.

`sdpipe.pipeline.train_any` sends text-to-image configs here and pixel ones to `pipeline.train_model`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState

from sdpipe.config import PipelineConfig
from sdpipe.data import SourceChangedError, ensure_validated, open_split
from sdpipe.progress import progress_bar
from sdpipe.train.components import base_of, make_components, makes_own_components, start_own_components
from sdpipe.train.t2i_run import TextToImageResult, train_text_to_image

TRAINING_REPORT = "training.json"


@dataclass(frozen=True)
class SavedModelDir:
    path: Path


@dataclass
class TrainedTextToImage:
    result: TextToImageResult
    model: SavedModelDir  # RUN/model
    seconds: dict[str, float]


class _PhaseBars:
    """Progress bars for callback-driven phases ("latents", "captions"): one bar each, opened on its first call."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.stack = enabled, ExitStack()
        self.bars: dict[str, Callable[..., None]] = {}
        self.done: dict[str, int] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.bars:
            self.bars[phase] = self.stack.enter_context(progress_bar(f"caching {phase}", total, self.enabled))
            self.done[phase] = 0
        self.bars[phase](done - self.done[phase])
        self.done[phase] = done

    def close(self) -> None:
        self.stack.close()


def train_t2i_model(
    cfg: PipelineConfig, run_dir: str | Path, show_progress: bool = True, resume: bool = False, revalidate: bool = False
) -> TrainedTextToImage:
    """Train a text-to-image model as `cfg.train.method` says, with progress bars for caching and training."""
    from sdpipe.pipeline import DataError, _progress_text

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    if cfg.data.source == "digits":
        raise DataError("model.type=text-to-image trains on captioned images: set data.source and data.path")
    try:
        ensure_validated(cfg.data, revalidate, show_progress)
    except SourceChangedError as exc:
        raise DataError(f"{exc}\n(or train with --revalidate)") from None
    data = open_split(cfg.data, "train")
    validating = cfg.train.validate_every is not None and cfg.data.validation_fraction > 0
    validation = open_split(cfg.data, "validation") if validating else None
    seconds = {"data": time.perf_counter() - t0}
    main = PartialState(cpu=True).is_main_process
    t = time.perf_counter()
    if makes_own_components(cfg):
        start_own_components(cfg, run_dir, resume)
        with progress_bar("training the VAE", cfg.train.vae_steps, show_progress and main) as advance:
            make_components(cfg, data, run_dir, resume=resume, progress=lambda step, row: advance(1))
        resume = True  # the UNet's run continues the folder this run claimed (from step 1 without checkpoints)
        seconds["components"], t = time.perf_counter() - t, time.perf_counter()
    phases = _PhaseBars(show_progress and main)
    try:
        with progress_bar("training", cfg.train.steps, show_progress and main) as advance:
            result = train_text_to_image(
                cfg,
                data,
                run_dir,
                resume=resume,
                validation=validation,
                progress=lambda step, row: advance(1, _progress_text(row)),
                cache_progress=phases,
            )
    finally:
        phases.close()
    seconds["train"] = time.perf_counter() - t
    if main:
        write_training_report(run_dir, cfg, result, seconds)
    return TrainedTextToImage(result, SavedModelDir(result.model_dir), seconds)


def write_training_report(run_dir: Path, cfg: PipelineConfig, result: TextToImageResult, seconds: dict) -> Path:
    """RUN/training.json: method, bucket plan, what the caches built and reused, losses, events, the validation
    prompts' grids, timings."""
    history = result.outcome.history
    report: dict[str, Any] = {
        "method": cfg.train.method,
        "base": base_of(cfg, run_dir),
        "steps": len(history),
        "final_loss": history[-1]["loss"] if history else None,
        "samples_per_s": result.outcome.samples_per_second,
        "bucket_plan": result.bucket_plan,
        "caches": result.caches,
        "events": result.outcome.events,
        "best_step": result.outcome.best_step,
        "stopped_early": result.outcome.stopped_early,
        "model": str(result.model_dir),
        "lora": None if result.lora_file is None else str(result.lora_file),
        # train.validation_prompts: [{step, path}] of each step's grid, and the grid over steps (paths in RUN)
        "validation_grids": result.validation_grids,
        "validation_grid": result.validation_grid,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    path = run_dir / TRAINING_REPORT
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path
