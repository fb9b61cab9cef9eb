"""Evaluate a saved model against its real data with the independent judge."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from sdpipe.config import EvaluateConfig
from sdpipe.data import Dataset
from sdpipe.evaluate.intervals import summarize
from sdpipe.evaluate.judge import Judge
from sdpipe.models import LoadedModel
from sdpipe.progress import progress_bar
from sdpipe.sampling import SampleSpec, generate
from sdpipe.sampling.files import pixels_to_source, to_pixels

# extra(pixels, requested labels) -> more metrics for the same samples (e.g. FID in a feature space)
ExtraScores = Callable[[np.ndarray, np.ndarray | None], dict]


def sample_pixels(
    model: LoadedModel, spec: SampleSpec, n: int, seed: int, show_progress: bool = True
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """n images as PNG pixels (labels cycling through the classes, seeds seed..seed+n-1), their labels, and
    the seconds it took to generate them."""
    meta = model.meta
    n_classes = len(meta.class_names) if meta.class_names else 0
    labels = [i % n_classes for i in range(n)] if n_classes else None
    start = time.perf_counter()
    with progress_bar(f"evaluating {spec.sampler} x{spec.steps} g={spec.guidance}", n, show_progress) as adv:
        x = generate(
            model.unet,
            model.scheduler_config,
            list(range(seed, seed + n)),
            labels,
            shape=(meta.channels, meta.image_size, meta.image_size),
            null_label=meta.null_label,
            spec=spec,
            progress=adv,
        )
    seconds = time.perf_counter() - start
    return to_pixels(x, meta.value_range), None if labels is None else np.array(labels), seconds


def sample_and_score(
    model: LoadedModel,
    judge: Judge,
    spec: SampleSpec,
    n: int,
    seed: int,
    show_progress: bool = True,
    extra: ExtraScores | None = None,
) -> dict:
    """Generate n images (labels cycling through the classes, seeds seed..seed+n-1) and judge them as PNG
    pixels, i.e. exactly what a user gets from `sdpipe generate`; `extra` adds metrics of its own."""
    pixels, labels, seconds = sample_pixels(model, spec, n, seed, show_progress)
    samples = pixels_to_source(pixels, model.meta.value_range)
    scores = judge.score(samples, labels)
    return {
        "sampler": spec.sampler,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "images_per_s": n / seconds,
        "seconds": seconds,
        **scores,
        **(extra(pixels, labels) if extra is not None else {}),
    }


def fit_judge(train: Dataset, heldout: Dataset, cfg: EvaluateConfig) -> Judge:
    """The judge for a model: fitted on its training part, comparing with its held-out part."""
    labels = train.labels if train.class_names else None
    return Judge.fit(
        train.images, labels, heldout.images, value_range=train.value_range, pca_components=cfg.pca_components,
        seed=cfg.seed,
    )  # fmt: skip


def score_sets(
    model: LoadedModel,
    judge: Judge,
    spec: SampleSpec,
    cfg: EvaluateConfig,
    sets: int,
    show_progress: bool = True,
    extra: ExtraScores | None = None,
) -> dict:
    """`sample_and_score` on `sets` independent sets of `cfg.n_samples` (set k: seeds seed + k*n, ...), as
    one row of means with their 95 % intervals (`sdpipe.evaluate.intervals.summarize`)."""
    n = cfg.n_samples
    rows = [sample_and_score(model, judge, spec, n, cfg.seed + k * n, show_progress, extra) for k in range(sets)]
    return {**summarize(rows), "seeds": [cfg.seed + k * n for k in range(sets)]}


def evaluate_model(
    model: LoadedModel,
    train: Dataset,
    heldout: Dataset,
    cfg: EvaluateConfig,
    spec: SampleSpec,
    show_progress: bool = True,
    extra: ExtraScores | None = None,
    judge: Judge | None = None,
) -> dict:
    """Metrics for the default sampling settings plus a guidance sweep, each over `cfg.sample_sets` sample
    sets, and how the judge was built; `extra` adds metrics of its own to every row."""
    judge = judge or fit_judge(train, heldout, cfg)
    default = score_sets(model, judge, spec, cfg, cfg.sample_sets, show_progress, extra)
    sweep = [default]
    for g in cfg.guidance_scales:
        if g != spec.guidance:
            other = SampleSpec(spec.sampler, spec.steps, g, spec.micro_batch)
            sweep.append(score_sets(model, judge, other, cfg, cfg.sample_sets, show_progress, extra))
    sweep.sort(key=lambda r: r["guidance"])
    return {
        "default": default,
        "guidance_sweep": sweep,
        "judge": {
            **judge.describe(),
            "training_split": train.dataset_id,
            "heldout_split": heldout.dataset_id,
            "classifier_accuracy_on_heldout": judge.heldout_accuracy(heldout.labels if heldout.class_names else None),
            "intervals": f"mean and 95 % Student-t interval over {cfg.sample_sets} independent sets of "
            f"{cfg.n_samples} samples",
        },
    }
