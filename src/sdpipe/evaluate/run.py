"""Evaluate a saved model against its real data with the independent judge."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import SVC

from sdpipe.config import EvaluateConfig
from sdpipe.data import Dataset
from sdpipe.evaluate.judge import Judge
from sdpipe.models import LoadedModel
from sdpipe.progress import progress_bar
from sdpipe.sampling import SampleSpec, generate
from sdpipe.sampling.files import pixels_to_source, to_pixels


def judge_accuracy_on_real(data: Dataset, seed: int) -> float:
    """5-fold cross-validated accuracy of the judge's classifier on real images: its own error rate."""
    x = data.images.reshape(len(data.images), -1)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(SVC(kernel="rbf", gamma="scale", C=10.0), x, data.labels, cv=folds).mean())


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


def fit_judge(data: Dataset, cfg: EvaluateConfig) -> Judge:
    return Judge.fit(data.images, data.labels, pca_components=cfg.pca_components, seed=cfg.seed)


def evaluate_model(
    model: LoadedModel,
    data: Dataset,
    cfg: EvaluateConfig,
    spec: SampleSpec,
    show_progress: bool = True,
    extra: ExtraScores | None = None,
    judge: Judge | None = None,
) -> dict:
    """Metrics for the default sampling settings plus a guidance sweep, and how the judge was built;
    `extra` adds metrics of its own to every row."""
    judge = judge or fit_judge(data, cfg)
    default = sample_and_score(model, judge, spec, cfg.n_samples, cfg.seed, show_progress, extra)
    sweep = [default]
    for g in cfg.guidance_scales:
        if g != spec.guidance:
            other = SampleSpec(spec.sampler, spec.steps, g, spec.micro_batch)
            sweep.append(sample_and_score(model, judge, other, cfg.n_samples, cfg.seed, show_progress, extra))
    sweep.sort(key=lambda r: r["guidance"])
    return {
        "default": default,
        "guidance_sweep": sweep,
        "judge": {
            "classifier": "sklearn SVC(rbf, C=10) on real pixels",
            "classifier_cv_accuracy_on_real": judge_accuracy_on_real(data, cfg.seed),
            "features": f"PCA({cfg.pca_components}) fitted on the real images",
            "fd_ratio_meaning": "Frechet distance to the real set / that of an equally large real subset",
            # for scale, two ends: new real digits (what a model that generalizes perfectly would score) and
            # random training images themselves (perfect memorization; min..max shows one set's spread)
            "heldout_real_fd_ratio": Judge.heldout_real_ratio(
                data.images, pca_components=cfg.pca_components, seed=cfg.seed
            ),
            "copied_training_images_fd_ratio": judge.copier_ratio(data.labels, cfg.n_samples),
            "near_copy_rule": "L2 to the nearest training image < smallest L2 between two distinct training images",
        },
    }
