"""`sdpipe demo shapes`: a text-to-image model trained from scratch on the project's own captioned shapes,
judged per caption kind with seen and held-out colour-shape pairs apart.

Steps, each a function of its stage: render the set (`data.shapes`) -> `sdpipe data validate` ->
`train.method: scratch` without `model.pretrained` (`pipeline_t2i`), which trains its own small VAE and takes a
small frozen random text encoder (`train.components`) before the UNet -> sample judge prompts with fixed seeds
through the one generation path -> `ShapesJudge` (fitted on rendered images only) -> metrics.json, samples.png
and report.html.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdpipe.config import PipelineConfig, load_config

GROUPS = {("single", False): "single/seen", ("single", True): "single/held_out",
          ("relation", False): "relation/seen", ("relation", True): "relation/held_out"}  # fmt: skip
GOALS = {"single/seen": 0.90, "relation/seen": 0.70, "single/held_out": 0.50, "relation/held_out": 0.50}


@dataclass(frozen=True)
class ShapesBudget:
    """How much the demo trains and judges (the defaults fit the 15-minute bar on 2 cores)."""

    n_train: int = 6000
    n_test: int = 400
    vae_steps: int = 600
    unet_steps: int = 900
    batch_size: int = 32
    prompts_per_group: int = 64
    sample_steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    # torch threads: one keeps its speed when other work takes the second core, where two threads collapse
    # (bench/train_t2i.py saw this for the LoRA step); one against two on an idle machine is not measured
    threads: int = 1
    # the small random text encoder trains with the UNet: single shapes 44 % -> 91 % (README, the shapes demo)
    text_encoder: bool = True


def _data_sets(out: Path) -> list[str]:
    return ["data.source=folder", f"data.path={out / 'data'}", f"data.validated_dir={out / 'validated'}",
            "data.resolution=32", "data.channels=rgb"]  # fmt: skip


def unet_config(out: Path, b: ShapesBudget, extra: Sequence[str] = ()) -> PipelineConfig:
    """The demo's run config; `extra` overrides (`key=value`) come last (bench/shapes_levers.py)."""
    return load_config(None, [
        *_data_sets(out), "model.type=text-to-image", "train.method=scratch", f"train.vae_steps={b.vae_steps}",
        "model.block_out_channels=[64, 128]", "model.attention_levels=[1]", "model.layers_per_block=1",
        "model.norm_num_groups=32", "model.attention_head_dim=32",
        "diffusion.formulation=ddpm", "diffusion.prediction_type=v_prediction", "train.loss_weighting=min_snr",
        "train.uncertainty_weighting=false", "train.caption_dropout=0.1", f"train.steps={b.unet_steps}",
        f"train.batch_size={b.batch_size}", "train.learning_rate=1e-3", "train.warmup_steps=50",
        "train.checkpoint_every=500", f"train.seed={b.seed}", f"train.cache_dir={out / 'cache'}",
        f"train.threads={b.threads}", f"train.train_text_encoder={str(b.text_encoder).lower()}",
        "sample.sampler=dpmpp_2m", f"sample.steps={b.sample_steps}", f"sample.guidance={b.guidance}", *extra,
    ])  # fmt: skip


def run_shapes_demo(out: str | Path, budget: ShapesBudget | None = None, show_progress: bool = True) -> dict[str, Any]:
    """The whole demo into `out`; returns the metrics (also in OUT/metrics.json)."""
    from sdpipe.data import open_split
    from sdpipe.data.shapes import write_folder
    from sdpipe.data.validate import validate
    from sdpipe.pipeline_t2i import train_t2i_model

    b, out = budget or ShapesBudget(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = t = time.perf_counter()
    counts = write_folder(out / "data", b.n_train, b.n_test, b.seed)
    cfg = unet_config(out, b)
    validate(str(out / "data"), out / "validated", cfg.data)
    seconds["data"], t = time.perf_counter() - t, time.perf_counter()

    trained = train_t2i_model(cfg, out / "run", show_progress)
    seconds["vae"] = trained.seconds["components"]
    seconds["unet"], t = time.perf_counter() - t - seconds["vae"], time.perf_counter()

    images, captions = sample_judge_prompts(trained.model.path, b, show_progress)
    seconds["sample"], t = time.perf_counter() - t, time.perf_counter()
    scores = judge(images, captions, b.seed)
    seconds["judge"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    metrics = {"budget": asdict(b), "data": counts, "judge": scores, "goals": GOALS,
               "vae_reconstruction_error": reconstruction_error(own_vae(out / "run"), open_split(cfg.data)),
               "final_loss": trained.result.outcome.history[-1]["loss"],
               "seconds": {k: round(v, 1) for k, v in seconds.items()}}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_samples(out / "samples.png", images, b.prompts_per_group)
    write_report(out / "report.html", metrics)
    return metrics


def judge_prompts(b: ShapesBudget) -> list[str]:
    from sdpipe.data.shapes import prompts

    return [p for (kind, held), _ in GROUPS.items() for p in prompts(b.prompts_per_group, b.seed + 1, kind, held)]


def sample_judge_prompts(model_dir: Path, b: ShapesBudget, show_progress: bool) -> tuple[np.ndarray, list[str]]:
    """One image per judge prompt (`judge_prompts`)."""
    from sdpipe.evaluate.captioned_judge import sample_prompts

    captions = judge_prompts(b)
    images = sample_prompts(model_dir, captions, b.sample_steps, b.guidance, show_progress, "sampling judge prompts")
    return images, captions


def judge(images: np.ndarray, captions: list[str], seed: int) -> dict[str, Any]:
    from sdpipe.evaluate.shapes_judge import ShapesJudge

    return ShapesJudge.fit(seed=seed).score(images, captions, sets=4)


def own_vae(run_dir: Path) -> Any:
    """The VAE a scratch run trained for itself (RUN/components/vae)."""
    from diffusers import AutoencoderKL

    from sdpipe.train.components import COMPONENTS

    return AutoencoderKL.from_pretrained(run_dir / COMPONENTS / "vae", local_files_only=True)


def reconstruction_error(vae: Any, data: Any, n: int = 256) -> float:
    """Mean absolute error of the VAE's reconstruction of `n` training images, in [0, 255] pixel units."""
    import torch

    x, _ = data.batch(torch.arange(min(n, len(data))), torch.Generator().manual_seed(0))
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float((rec - x).abs().mean() * 127.5)


def write_samples(path: Path, images: np.ndarray, per_group: int, columns: int = 16, rows: int = len(GROUPS)) -> None:
    """A grid: per group (`rows` of them, `per_group` images each), the first `columns` samples in a row."""
    grid_rows = [images[g * per_group : g * per_group + columns] for g in range(rows)]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in grid_rows if len(r) == columns], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(path)


def write_report(path: Path, metrics: dict[str, Any]) -> None:
    from sdpipe.evaluate.intervals import fmt

    lines = []
    for name, goal in GOALS.items():
        group = metrics["judge"].get(name)
        if group:
            lines.append(f"<tr><td>{name}</td><td>{group['n']}</td><td>{fmt(group['share'], 1, percent=True)}</td>"
                         f"<td>{goal:.0%}</td></tr>")  # fmt: skip
    body = "\n".join(lines)
    seconds = html.escape(json.dumps(metrics["seconds"]))
    path.write_text(
        "<html><head><meta charset='utf-8'><title>sdpipe demo: shapes</title></head><body>"
        "<h1>sdpipe demo: shapes</h1><p>Share of samples the judge reads as the caption (mean over 4 sets, 95 % "
        "interval).</p><table border=1><tr><th>group</th><th>n</th><th>correct</th><th>goal</th></tr>"
        f"{body}</table><p><img src='samples.png'> (rows: {', '.join(GROUPS.values())})</p><p>seconds: {seconds}</p>"
        "</body></html>\n"
    )
