"""Validation prompts rendered while a text-to-image model trains (`train.validation_prompts`, every
`train.validation_prompt_every` steps): how the model's images of fixed prompts and seeds change over training.

Each time, the trainer hands the EMA weights (swapped into the UNet in training, in eval mode) to a
`ValidationRenderer`, which renders every prompt with the seeds `train.seed + k` (k < `IMAGES_PER_PROMPT`),
the `sample` section's sampler, steps and guidance, at `data.resolution`, through the one generation path
(`generate_items`), and saves RUN/validation/step_{N:06d}.png: one row per prompt. At the end of the run,
`write_steps_grid` puts them side by side in RUN/validation/grid.png: a row per (prompt, seed), a column per step.

Rendering never changes the training: the images come from their own generators (the generation path's
per-image `torch.Generator`s), the global RNG's state is put back after (in case anything in the pipeline draws
from it) and the trainer restores the training weights and mode. The same run gives the same PNG bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from sdpipe.conditioning import Conditioning
from sdpipe.config import ConfigError, PipelineConfig
from sdpipe.models.pipelines import PipelineParts
from sdpipe.sampling.files import to_pixels
from sdpipe.sampling.generate import Row, SampleSpec, generate_items

FOLDER = "validation"  # under the run folder
GRID_FILE = "grid.png"  # the grid over steps
IMAGES_PER_PROMPT = 4  # seeds train.seed .. train.seed + 3
GAP = 2  # white pixels between images, as the evaluation's prompt grids


class TrainingParts(PipelineParts):
    """The pipeline whose UNet is the module in training, as the generation path sees it.

    `prepare` does nothing. `PipelineParts.prepare` calls `apply_loras(pipe, cond.loras)`, which makes the rows'
    LoRAs exactly the active adapters and, with none, calls `pipe.disable_lora()` once any LoRA was loaded through
    it. It does not know the training's peft adapter ("default", added by `unet.add_adapter`): today, on a base
    that never had a LoRA applied, an empty tuple leaves it alone, but a base that had one (through the
    generation path, or a later change there) would have the training adapter switched off with the others, so
    the images would show the base and the training would go on without its LoRA. Validation images take no
    LoRAs of their own, so nothing needs preparing.

    Its `scheduler_config` is the one the model is saved with (the training's prediction type; DDIM trailing
    timesteps after zero-terminal-SNR training), so samplers are built as `sdpipe generate` will build them."""

    def __init__(self, pipe: Any, scheduler_config: dict[str, Any]) -> None:
        super().__init__(pipe)
        self.scheduler_config = dict(scheduler_config)

    def prepare(self, cond: Conditioning) -> None:
        """Leave the pipeline's adapters as the training set them (see the class)."""


def check_settings(cfg: PipelineConfig) -> bool:
    """True when the run renders validation prompts; both settings or neither (ConfigError naming the other)."""
    t = cfg.train
    if t.validation_prompts and t.validation_prompt_every is None:
        raise ConfigError("train.validation_prompts needs train.validation_prompt_every (render every N steps)")
    if t.validation_prompt_every is not None and not t.validation_prompts:
        raise ConfigError("train.validation_prompt_every needs train.validation_prompts (the prompts to render)")
    return bool(t.validation_prompts)


class ValidationRenderer:
    """Renders the validation prompts with the pipeline's current UNet weights into RUN/validation."""

    def __init__(
        self,
        cfg: PipelineConfig,
        pipe: Any,
        run_dir: Path,
        size: int,
        scheduler_config: dict[str, Any],
        main: bool = True,
    ) -> None:
        t, s = cfg.train, cfg.sample
        self.prompts = list(t.validation_prompts)
        self.seeds = [t.seed + k for k in range(IMAGES_PER_PROMPT)]
        # the seeds fill one micro-batch per prompt (row seed % micro_batch), so no padding rows are run
        self.spec = SampleSpec(s.sampler, s.steps, s.guidance, min(s.micro_batch, IMAGES_PER_PROMPT))
        self.parts = TrainingParts(pipe, scheduler_config)
        for p in self.prompts:  # a prompt the encoder refuses stops the run before training, not at step N
            self.parts.check_prompt(p, f"train.validation_prompts {p!r}")
        self.rows = [
            Row(seed, Conditioning(prompt=p, width=size, height=size)) for p in self.prompts for seed in self.seeds
        ]
        self.run_dir, self.size, self.main = run_dir, size, main

    def render(self) -> list[np.ndarray]:
        """Each prompt's images, uint8 (IMAGES_PER_PROMPT, H, W, 3), from the UNet's weights as they are now."""
        device = self.parts.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            images = generate_items(self.parts, self.rows, self.spec)
        pixels = to_pixels(torch.stack([images[r] for r in self.rows]), (0.0, 1.0))
        n = IMAGES_PER_PROMPT
        return [pixels[i * n : (i + 1) * n] for i in range(len(self.prompts))]

    def step_path(self, step: int) -> str:
        return f"{FOLDER}/step_{step:06d}.png"

    def __call__(self, step: int) -> dict[str, str]:
        """Render (on the main process) and save RUN/validation/step_{step}.png; returns its path, relative to
        the run folder, as the `evaluation` event's `validation_grid`."""
        rel = self.step_path(step)
        if self.main:
            grid = _grid([list(images) for images in self.render()])
            _save(grid, self.run_dir / rel, {"step": step, "prompts": self.prompts, "seeds": self.seeds})
        return {"validation_grid": rel}


def step_grids(events: list[dict]) -> list[dict[str, Any]]:
    """[{step, path}] of the run's validation grids, in step order, from its events (those of a resumed run's
    first part included; a rollback drops the ones it supersedes)."""
    found = {int(e["step"]): str(e["validation_grid"]) for e in events if e.get("validation_grid")}
    return [{"step": s, "path": found[s]} for s in sorted(found)]


def write_steps_grid(run_dir: Path, grids: list[dict[str, Any]], prompts: list[str], size: int) -> str | None:
    """RUN/validation/grid.png from the step grids: a row per (prompt, seed), a column per step; its path
    relative to the run folder, or None when no step was rendered."""
    if not grids:
        return None
    n = IMAGES_PER_PROMPT
    columns = []
    for g in grids:
        with Image.open(run_dir / g["path"]) as im:
            px = np.asarray(im.convert("RGB"))
        tiles = []
        for p in range(len(prompts)):
            for k in range(n):
                y, x = p * (size + GAP), k * (size + GAP)
                tiles.append(px[y : y + size, x : x + size])
        columns.append(tiles)
    rows = [[col[r] for col in columns] for r in range(len(prompts) * n)]
    rel = f"{FOLDER}/{GRID_FILE}"
    steps = [g["step"] for g in grids]
    _save(_grid(rows), run_dir / rel, {"steps": steps, "prompts": prompts, "images_per_prompt": n})
    return rel


def _grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Images (H, W, 3) laid out row by row, GAP white pixels apart."""
    h, w = rows[0][0].shape[:2]
    width = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + GAP) - GAP, width * (w + GAP) - GAP, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = i * (h + GAP), j * (w + GAP)
            out[y : y + h, x : x + w] = image
    return out


def _save(pixels: np.ndarray, path: Path, info: dict[str, Any]) -> None:
    """A PNG with `info` as its `sdpipe` text chunk (JSON): the same pixels and info give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = PngImagePlugin.PngInfo()
    chunk.add_text("sdpipe", json.dumps(info, sort_keys=True))
    Image.fromarray(pixels).save(path, pnginfo=chunk)
