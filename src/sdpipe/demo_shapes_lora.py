"""`sdpipe demo shapes-lora --base SHAPES_OUT`: fine-tuning shown end to end on the shapes model.

A LoRA teaches the trained shapes model (`sdpipe demo shapes`) a shape it has never seen, the diamond
(`data.shapes.NEW_SHAPE`), from at most 50 captioned images: most show a diamond in some colour (alone or beside
an old shape), the rest are ordinary old samples so the old prompts keep being shown. Steps: render the set ->
`sdpipe data validate` -> `train.method: lora` on the base model (`pipeline_t2i`) -> the judge's prompts for every
group, old and new, sampled with the same seeds from the base model and from the LoRA run's model
(RUN/model: base + LoRA) -> `ShapesJudge` on both -> per group the share before, after and their difference,
each with an interval over paired sample sets (the same prompts and seeds in each set).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdpipe.config import PipelineConfig, load_config
from sdpipe.demo_shapes import GROUPS, write_samples
from sdpipe.evaluate.captioned_judge import sample_prompts

NEW_GROUPS = {("single", "new"): "single/new", ("relation", "new"): "relation/new"}
MAX_POINTS_LOST = 5.0  # the bar: the old prompts lose at most this many points


@dataclass(frozen=True)
class LoraBudget:
    """What the fine-tune uses: at most 50 images, minutes of training on 2 cores."""

    n_images: int = 50
    new_share: float = 0.8
    steps: int = 300
    batch_size: int = 16
    rank: int = 8
    # the attention blocks' projections; adding the resnets' convolutions ("conv1", "conv2") and 400 steps did
    # no better (README, the shapes demo)
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")
    learning_rate: float = 1e-3
    text_encoder: bool = False  # a LoRA on the text encoder too (train.train_text_encoder)
    prompts_per_group: int = 64
    sample_steps: int = 20
    guidance: float = 3.0
    sets: int = 4
    seed: int = 0
    threads: int = 1  # as the shapes demo (ShapesBudget.threads)


def lora_config(out: Path, base_model: Path, b: LoraBudget) -> PipelineConfig:
    return load_config(None, [
        "data.source=folder", f"data.path={out / 'data'}", f"data.validated_dir={out / 'validated'}",
        "data.resolution=32", "data.channels=rgb", "data.test_fraction=0", "data.validation_fraction=0",
        "model.type=text-to-image", f"model.pretrained={base_model}", "diffusion.formulation=ddpm",
        "train.method=lora",
        f"train.lora_rank={b.rank}", f"train.lora_targets=[{', '.join(b.targets)}]",
        "train.loss_weighting=min_snr", "train.uncertainty_weighting=false", "train.caption_dropout=0.1",
        f"train.steps={b.steps}", f"train.batch_size={b.batch_size}", f"train.learning_rate={b.learning_rate}",
        "train.warmup_steps=20", f"train.checkpoint_every={b.steps}", f"train.seed={b.seed}",
        f"train.cache_dir={out / 'cache'}", "sample.sampler=dpmpp_2m", f"sample.steps={b.sample_steps}",
        f"sample.guidance={b.guidance}", f"train.threads={b.threads}",
        f"train.train_text_encoder={str(b.text_encoder).lower()}",
    ])  # fmt: skip


def base_model_of(base: str | Path) -> Path:
    """The model folder of a shapes demo's output (BASE/run/model), or BASE itself when it is a model."""
    base = Path(base)
    model = base / "run" / "model"
    if model.is_dir():
        return model
    if (base / "model_index.json").is_file() or (base / "sdpipe.json").is_file():
        return base
    raise ValueError(f"{base}: not a shapes demo output (no run/model inside) nor a model folder; run "
                     "`sdpipe demo shapes --out DIR` first and pass that DIR as --base")  # fmt: skip


def judge_prompts(b: LoraBudget) -> list[str]:
    """Per group (the base demo's four, then the new shape's two) `prompts_per_group` captions."""
    from sdpipe.data.shapes import prompts

    n, seed = b.prompts_per_group, b.seed + 1
    old = [p for (kind, held), _ in GROUPS.items() for p in prompts(n, seed, kind, held)]
    return old + [p for (kind, _), _ in NEW_GROUPS.items() for p in prompts(n, seed, kind, False, new=True)]


def run_shapes_lora_demo(
    base: str | Path, out: str | Path, budget: LoraBudget | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """The whole fine-tune into `out`; returns the metrics (also in OUT/metrics.json)."""
    from sdpipe.data.shapes import concept_samples
    from sdpipe.data.shapes import write_samples as write_images
    from sdpipe.data.validate import validate
    from sdpipe.evaluate.shapes_judge import ShapesJudge
    from sdpipe.pipeline_t2i import train_t2i_model

    b, out, base_model = budget or LoraBudget(), Path(out), base_model_of(base)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    counts = write_images(out / "data", concept_samples(b.n_images, b.seed, b.new_share))
    cfg = lora_config(out, base_model, b)
    validate(str(out / "data"), out / "validated", cfg.data)
    trained = train_t2i_model(cfg, out / "run", show_progress)
    seconds["train"], t = time.perf_counter() - t, time.perf_counter()

    captions = judge_prompts(b)
    before = sample_prompts(base_model, captions, b.sample_steps, b.guidance, show_progress, "sampling the base")
    after = sample_prompts(trained.model.path, captions, b.sample_steps, b.guidance, show_progress, "sampling +LoRA")
    seconds["sample"], t = time.perf_counter() - t, time.perf_counter()
    judge = ShapesJudge.fit(seed=b.seed)
    scores = compare(judge, before, after, captions, b.sets)
    seconds["judge"] = time.perf_counter() - t
    metrics = {"budget": asdict(b), "base_model": str(base_model), "data": counts, "judge": scores,
               "bar": {"max_points_lost": MAX_POINTS_LOST},
               "seconds": {k: round(v, 1) for k, v in seconds.items()}}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    per_group = b.prompts_per_group
    write_samples(out / "samples_base.png", before, per_group, rows=len(captions) // per_group)
    write_samples(out / "samples_lora.png", after, per_group, rows=len(captions) // per_group)
    return metrics


def compare(judge: Any, before: np.ndarray, after: np.ndarray, captions: list[str], sets: int) -> dict[str, Any]:
    """Per group: the share right before and after, and after - before over paired sets (same prompts and
    seeds in set k of both), in points; each {"mean", "low", "high", "values"} from `intervals.interval`."""
    from sdpipe.evaluate.intervals import interval
    from sdpipe.evaluate.shapes_judge import group_of

    groups = np.asarray([group_of(c) for c in captions])
    right_before = np.asarray([judge.correct(img, c) for img, c in zip(before, captions, strict=True)], float)
    right_after = np.asarray([judge.correct(img, c) for img, c in zip(after, captions, strict=True)], float)
    out: dict[str, Any] = {}
    for group in dict.fromkeys(groups):
        where = np.flatnonzero(groups == group)
        chunks = np.array_split(where, min(sets, len(where)))
        b_sets = [float(right_before[c].mean()) for c in chunks]
        a_sets = [float(right_after[c].mean()) for c in chunks]
        out[str(group)] = {
            "n": len(where),
            "before": interval(b_sets),
            "after": interval(a_sets),
            "change_points": interval([100 * (a - b) for a, b in zip(a_sets, b_sets, strict=True)]),
        }
    return out
