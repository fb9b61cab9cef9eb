"""A text-to-image run from start to saved model: base, data, caches, the shared trainer, the export.

`full` and `scratch` save RUN/model as a diffusers pipeline folder that vanilla `StableDiffusionPipeline`
(or the SDXL one) loads. `lora` saves RUN/lora.safetensors in kohya's key format (what the web UIs and
ComfyUI read; diffusers' `load_lora_weights` reads it too) and RUN/model/sdpipe.json naming the base and the
LoRA, so `sdpipe generate --model RUN/model` samples the base with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sdpipe.config import PipelineConfig
from sdpipe.data import ImageSet
from sdpipe.train.components import base_of
from sdpipe.train.loop import start_run
from sdpipe.train.t2i import TextToImageTask, load_base
from sdpipe.train.t2i_grid import ValidationRenderer, check_settings, step_grids, write_steps_grid
from sdpipe.train.t2i_text import ENCODERS, kohya_text_prefix, text_lora_state_dict
from sdpipe.train.trainer import Trainer, TrainOutcome

LORA_FILE = "lora.safetensors"


@dataclass
class TextToImageResult:
    outcome: TrainOutcome
    model_dir: Path
    lora_file: Path | None = None
    caches: dict[str, Any] = field(default_factory=dict)
    bucket_plan: dict[str, Any] = field(default_factory=dict)
    validation_grids: list[dict[str, Any]] = field(default_factory=list)  # [{step, path}], paths in the run folder
    validation_grid: str | None = None  # RUN/validation/grid.png (relative): the grids over steps


def train_text_to_image(
    cfg: PipelineConfig,
    data: ImageSet,
    run_dir: str | Path,
    *,
    resume: bool = False,
    validation: ImageSet | None = None,
    progress: Callable[[int, dict], None] | None = None,
    cache_progress: Callable[[str, int, int], None] | None = None,
) -> TextToImageResult:
    """Train as `cfg.train.method` says and save RUN/model (and RUN/lora.safetensors for a LoRA)."""
    run_dir = Path(run_dir)
    rendering = check_settings(cfg)
    accelerator, gen = start_run(cfg.train, run_dir, resume)
    base = load_base(base_of(cfg, run_dir), device=str(accelerator.device))
    task = TextToImageTask(cfg, base, data, gen, accelerator.device, validation, cache_progress)
    trainer = Trainer(cfg.train, cfg.model_dump(mode="json"), run_dir, task, accelerator, gen)
    evaluator: Callable[[nn.Module], dict] | None = None
    size = cfg.data.resolution or task.plan.resolution
    if rendering:
        scheduler = sampling_scheduler(
            task.pipe.scheduler, task.sched.config["prediction_type"], cfg.diffusion.zero_terminal_snr
        )
        renderer = ValidationRenderer(
            cfg, task.pipe, run_dir, size, dict(scheduler.config), main=accelerator.is_main_process
        )

        def render(module: nn.Module) -> dict:
            # `module` is task.pipe.unet with the EMA weights swapped in: what the renderer samples
            return renderer(trainer.step)

        evaluator = render

    outcome = trainer.run(resume, progress, evaluator, cfg.train.validation_prompt_every)
    result = TextToImageResult(
        outcome,
        run_dir / "model",
        caches={"latents": task.latent_stats, "text": task.text_stats},
        bucket_plan=task.plan.summary(),
    )
    if rendering:
        result.validation_grids = step_grids(outcome.events)
    if accelerator.is_main_process:
        if rendering:
            result.validation_grid = write_steps_grid(run_dir, result.validation_grids, renderer.prompts, size)
        training = _training_record(cfg, task, base)
        unet, encoders = task.trained_unet(outcome.module), task.trained_text_encoders(outcome.module)
        if cfg.train.method == "lora":
            result.lora_file = save_lora(unet, encoders, run_dir / LORA_FILE, cfg, base)
            write_lora_model(run_dir / "model", result.lora_file, base, training)
        else:
            trained = {"unet": unet, **dict(zip(ENCODERS, encoders, strict=False))}
            save_pipeline(task.pipe, trained, run_dir / "model", training)
    accelerator.wait_for_everyone()
    return result


def _training_record(cfg: PipelineConfig, task: TextToImageTask, base: Any) -> dict[str, Any]:
    """What the model records of its training: method, base, data, the bucket plan, the noise process."""
    return {
        "method": cfg.train.method,
        "base": {"path": str(Path(base.path).resolve()), "hash": base.hash},
        "dataset_id": task.data.dataset_id,
        "data": cfg.data.model_dump(mode="json"),  # where the held-out split is (`sdpipe evaluate --held-out`)
        "bucket_plan": task.plan.to_json(),
        "prediction_type": task.sched.config["prediction_type"],
        "zero_terminal_snr": cfg.diffusion.zero_terminal_snr,
        # how the run's samples are drawn by default (`sdpipe evaluate --held-out` samples with it)
        "sample": {k: v for k, v in cfg.sample.model_dump(mode="json").items() if k != "micro_batch"},
    }


def save_pipeline(pipe: Any, trained: dict[str, nn.Module], out: Path, training: dict[str, Any]) -> None:
    """The base pipeline with the trained parts (`unet`, and `text_encoder`[`_2`] where they trained) as a
    diffusers folder; its scheduler keeps the base's class
    with the training's prediction type (DDIM with trailing timesteps after zero-terminal-SNR training, as Lin
    et al. 2024 sample). `sdpipe_training.json` beside model_index.json records the training."""
    import inspect

    scheduler = sampling_scheduler(pipe.scheduler, training["prediction_type"], training["zero_terminal_snr"])
    parts = {**pipe.components, **trained, "scheduler": scheduler}
    if "requires_safety_checker" in inspect.signature(type(pipe)).parameters:
        parts["requires_safety_checker"] = False
    type(pipe)(**parts).save_pretrained(out, safe_serialization=True)
    (out / "sdpipe_training.json").write_text(json.dumps(training, indent=2) + "\n")


def sampling_scheduler(base: Any, prediction: str, zero_terminal_snr: bool) -> Any:
    """The scheduler a trained model samples with: the base's class with the training's prediction type, or
    DDIM with trailing timesteps after zero-terminal-SNR training (as Lin et al. 2024 sample)."""
    from diffusers import DDIMScheduler

    if zero_terminal_snr:
        return DDIMScheduler.from_config(
            base.config, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type=prediction
        )
    return type(base).from_config(base.config, prediction_type=prediction)


def lora_state_dict(
    unet: nn.Module, alpha: float, encoders: list[nn.Module] | None = None, xl: bool = False
) -> dict[str, torch.Tensor]:
    """The UNet's (and the trained text encoders') LoRA in kohya's keys (`lora_unet_…​.lora_down.weight`,
    `.lora_up.weight`, `.alpha`; `lora_te_…` for SD's text encoder, `lora_te1_`/`lora_te2_` for SDXL's)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    peft.update(text_lora_state_dict(encoders or []))
    kohya = {kohya_text_prefix(k, xl): v for k, v in convert_state_dict_to_kohya(peft).items()}
    # diffusers writes alpha = rank (scale 1); kohya's loaders scale by alpha / rank, so give the real alpha
    return {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v for k, v in kohya.items()}


def save_lora(unet: nn.Module, encoders: list[nn.Module], path: Path, cfg: PipelineConfig, base: Any) -> Path:
    """RUN/lora.safetensors, with the base's hash and the training settings in its metadata."""
    t = cfg.train
    alpha = t.lora_alpha if t.lora_alpha is not None else float(t.lora_rank)
    metadata = {
        "sdpipe.base_hash": base.hash,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(t.lora_rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": _base_version(base),
    }
    xl = hasattr(base.pipe, "text_encoder_2")
    save_file(lora_state_dict(unet, alpha, encoders, xl), str(path), metadata=metadata)
    return path


def _base_version(base: Any) -> str:
    pipe = base.pipe
    if hasattr(pipe, "text_encoder_2"):
        return "sdxl_base_v1-0"
    return "sd_2.0" if int(pipe.unet.config.cross_attention_dim) == 1024 else "sd_v1"


def write_lora_model(out: Path, lora: Path, base: Any, training: dict[str, Any]) -> None:
    """RUN/model/sdpipe.json: a `lora` kind model, the base with the run's LoRA."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": 2,
        "kind": "lora",
        "base": str(Path(base.path).resolve()),
        "base_hash": base.hash,
        "lora": str(lora.resolve()),
        "training": training,
    }
    (out / "sdpipe.json").write_text(json.dumps(meta, indent=2) + "\n")
