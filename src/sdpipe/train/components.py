"""The components `train.method: scratch` makes when `model.pretrained` is not given: RUN/components, a diffusers
pipeline folder that the UNet's training then takes as its base.

- The VAE is trained on the run's own training images (`train.vae`, the shared trainer, in RUN/vae, so it
  resumes too): no Stable Diffusion VAE exists offline for small images, and SD's 8x VAE would leave a 32x32
  image a 4x4 latent. Measured on the shapes set: a (16, 32) VAE reconstructs to a mean error of about 5 of
  255 after 600 steps (README, the shapes demo).
- The text encoder is a small CLIP text model with random weights under CLIP's tokenizer as sdpipe ships it
  (`models.components`). Frozen (the default), its random features still tell the words and their order apart
  and its embeddings are cached once; with `train.train_text_encoder` it trains with the UNet, which the shapes
  demo does: on the same components, 91 % of single-shape samples right against 44 % frozen (README).

The VAE's training uses the run's `train` settings (data, batch size, seed, optimizer, precision, NaN policy,
checkpoint interval, threads ...) with `train.vae_steps` steps and `VAE_TRAIN` in place of the UNet's learning
rate, warm-up, EMA and in-training evaluation.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import PartialState

from sdpipe.config import PipelineConfig
from sdpipe.data import ImageSet
from sdpipe.train.interrupt import TrainingInterrupted
from sdpipe.train.run_dir import COMPONENT_FILES, RunFolderError, check_new_run, write_run_config

COMPONENTS, VAE_RUN, PARTIAL = COMPONENT_FILES
VAE_TRAIN: dict[str, Any] = {
    "learning_rate": 1e-3,
    "warmup_steps": 20,
    "uncertainty_weighting": False,
    "ema_decay": 0.99,
    "validate_every": None,
    "eval_every": None,
    "validation_prompts": [],
    "validation_prompt_every": None,
}


def makes_own_components(cfg: PipelineConfig) -> bool:
    return cfg.model.type == "text-to-image" and cfg.train.method == "scratch" and cfg.model.pretrained is None


def vae_training_config(cfg: PipelineConfig) -> PipelineConfig:
    """The run's config with the VAE's training settings: `train.vae_steps` steps and `VAE_TRAIN`."""
    train = cfg.train.model_copy(update={"steps": cfg.train.vae_steps, **VAE_TRAIN})
    return cfg.model_copy(update={"train": train})


def base_of(cfg: PipelineConfig, run_dir: Path) -> str:
    """The base pipeline a text-to-image run trains on: `model.pretrained`, or the run's own RUN/components.
    The config keeps `model.pretrained: null`, so a resumed run (and RUN/config.yaml) says what the user said."""
    if cfg.model.pretrained is not None:
        return cfg.model.pretrained
    if not makes_own_components(cfg):
        raise ValueError(f"train.method={cfg.train.method} needs model.pretrained: the base pipeline")
    return str(run_dir / COMPONENTS)


def start_own_components(cfg: PipelineConfig, run_dir: Path, resume: bool) -> None:
    """Before the VAE trains: a new run claims its folder (no other run's files, no components left by an earlier
    start) and writes RUN/config.yaml (the whole run's config), so a run cut while its VAE trains resumes as itself
    with `sdpipe train --out RUN --resume`."""
    state = PartialState(cpu=True)
    if not resume:
        check_new_run(run_dir)
        if (run_dir / COMPONENTS).exists():
            raise RunFolderError(
                f"{run_dir / COMPONENTS} exists from an earlier start of this run: continue it with --resume, "
                "replace it with --overwrite, or choose another folder"
            )
    state.wait_for_everyone()  # every process has checked before the main one writes
    if not resume and state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, cfg.model_dump(mode="json"))
    state.wait_for_everyone()


def make_components(
    cfg: PipelineConfig,
    data: ImageSet,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: Callable[[int, dict], None] | None = None,
) -> Path:
    """RUN/components: a VAE trained on `data` (in RUN/vae), its latent scale, CLIP's tokenizer and a small random
    text encoder. A complete folder from an earlier attempt of this run is kept (resume; `start_own_components`
    refuses one a new run finds); a VAE run cut short resumes from its last checkpoint."""
    from sdpipe.models.components import save_components, small_vae
    from sdpipe.train.vae import latent_scale, train_vae

    folder = run_dir / COMPONENTS
    if (folder / "model_index.json").is_file():
        return folder
    vae_dir = run_dir / VAE_RUN
    seed, m = cfg.train.seed, cfg.model
    vae = small_vae(tuple(m.vae_channels), seed=seed)
    try:
        again = resume and vae_dir.exists()
        vae = train_vae(vae_training_config(cfg), vae, data, vae_dir, resume=again, progress=progress)
    except TrainingInterrupted as stop:  # the run to resume is RUN, not RUN/vae
        raise TrainingInterrupted(stop.signum, stop.step, stop.steps, run_dir, stop.checkpoint) from None
    vae.register_to_config(scaling_factor=latent_scale(vae, data))
    state = PartialState(cpu=True)
    try:
        if state.is_main_process:
            partial = run_dir / PARTIAL
            shutil.rmtree(partial, ignore_errors=True)
            save_components(partial, vae, text_width=m.text_width, text_layers=m.text_layers, seed=seed)
            partial.rename(folder)  # whole or absent: a cut during saving leaves no half folder behind
    finally:
        state.wait_for_everyone()  # the others never wait for a main process that failed
    return folder
