"""`sdpipe evaluate`: every quality number for a saved model, in one deterministic run.

On top of the judge's numbers (`evaluate_model`: FD ratio, label accuracy, near-copies, guidance sweep) it
measures, for the same samples, FID, KID, precision and recall in a feature space (`features.py`), the
per-class accuracy of a classifier trained on the real data, memorization with the closest pairs, a
quality-versus-steps table for each sampler, and looks inside: denoising trajectories and attention maps.
Seeds are fixed and real-data features are cached, so two runs give the same numbers (timings aside).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdpipe.config import ConfigError, EvaluateConfig, validate_config
from sdpipe.data import Dataset, open_split
from sdpipe.evaluate.features import (
    FeatureExtractor,
    FeatureNet,
    InceptionFeatures,
    load_or_train_feature_net,
    real_features,
    source_to_pixels,
)
from sdpipe.evaluate.inside import attention_maps, trajectory
from sdpipe.evaluate.judge import Judge
from sdpipe.evaluate.metrics import fid_kid, memorization, per_class_accuracy, precision_recall
from sdpipe.evaluate.run import evaluate_model, fit_judge, sample_and_score
from sdpipe.models import LoadedModel
from sdpipe.sampling import SampleSpec
from sdpipe.sampling.files import pixels_to_source
from sdpipe.train import make_objective, validation_loss

# the sweep's samplers when none are asked for: those of these that apply to the model (an EDM model takes
# euler and dpmpp_2m)
DEFAULT_SAMPLERS = ["ddim", "euler", "dpmpp_2m", "unipc"]
DEFAULT_STEPS = [5, 10, 20, 50]


@dataclass
class EvaluationResult:
    metrics: dict  # what goes to metrics.json
    pictures: dict = field(default_factory=dict)  # arrays for the report: pairs, trajectory, attention


@dataclass
class FeatureScorer:
    """Scores generated pixels in one feature space against the cached features of the real data."""

    extractor: FeatureExtractor
    real: np.ndarray
    classifier: FeatureNet
    class_names: list[str] | None
    seed: int
    seen: list[np.ndarray] = field(default_factory=list)  # pixels scored, in order (for memorization pairs)

    def __call__(self, pixels: np.ndarray, labels: np.ndarray | None) -> dict:
        self.seen.append(pixels)
        fake = self.extractor.features(pixels)
        out = {**fid_kid(self.real, fake, seed=self.seed), **precision_recall(self.real, fake)}
        if labels is not None and self.class_names:
            acc = per_class_accuracy(self.classifier.predict(pixels), labels, self.class_names)
            out["classifier_accuracy"] = acc["accuracy"]
            out["classifier_accuracy_per_class"] = acc["per_class"]
        return out


def make_scorer(train: Dataset, heldout: Dataset, cfg: EvaluateConfig, inception: Path | None) -> FeatureScorer:
    """The feature network (always: it is also the classifier), trained on the training part, and the chosen
    extractor, with the held-out part's features as the real side of FID, KID, precision and recall."""
    if len(train.class_names or []) < 2:
        raise ValueError(
            f"data {train.dataset_id} has no class labels: sdpipe's feature network and the judge are classifiers "
            "trained on labelled real data, so evaluating against unlabelled data is not supported yet"
        )
    pixels = source_to_pixels(train.images, train.value_range)
    net = load_or_train_feature_net(pixels, train.labels, len(train.class_names), train.dataset_id)
    extractor: FeatureExtractor = InceptionFeatures(inception) if inception is not None else net
    real = real_features(extractor, source_to_pixels(heldout.images, heldout.value_range), heldout.dataset_id)
    return FeatureScorer(extractor, real, net, train.class_names, cfg.seed)


def steps_sweep(
    model: LoadedModel,
    scorer: FeatureScorer,
    judge: Judge,
    default: dict,
    spec: SampleSpec,
    cfg: EvaluateConfig,
    samplers: list[str],
    steps: list[int],
    show_progress: bool,
) -> list[dict]:
    """Quality and images/s of each sampler at each number of steps (the default guidance, same seeds);
    `default` is the row already measured for `spec`."""
    rows = []
    for sampler in samplers:
        for n_steps in steps:
            if (sampler, n_steps) == (spec.sampler, spec.steps):
                row = default
            else:
                other = SampleSpec(sampler, n_steps, spec.guidance, spec.micro_batch)
                row = sample_and_score(model, judge, other, cfg.n_samples, cfg.seed, show_progress, scorer)
                row["sets"] = 1  # one set per cell: the table shows trends; the default row has the intervals
                scorer.seen.clear()
            rows.append(_sweep_row(row))
    return rows


def _sweep_row(row: dict) -> dict:
    keys = ["sampler", "steps", "guidance", "fid", "kid_mean", "precision", "recall", "fd_ratio"]
    keys += ["two_sample_accuracy", "classifier_accuracy", "label_accuracy", "images_per_s", "sets"]
    return {k: row[k] for k in keys if k in row}


def model_validation_loss(model: LoadedModel, max_images: int = 5000) -> dict:
    """The training loss at fixed noise (`sdpipe.train.validation_loss`) on the model's validation split,
    read as training read it (`sdpipe.data.open_split`), or on its training split when it had none."""
    try:
        cfg = validate_config(model.meta.config)
    except ConfigError as exc:
        return {"value": None, "why": f"the model's saved config does not validate any more: {exc}"}
    split, on = "train", "the training split: the model was trained without a validation split"
    if cfg.data.validation_fraction > 0:
        split, on = "validation", f"the validation split ({cfg.data.validation_fraction:.0%} by content hash)"
    try:
        images = open_split(cfg.data, split)
    except (ValueError, RuntimeError) as exc:  # e.g. an empty split, or data that changed since
        return {"value": None, "why": str(exc)}
    n = min(len(images), max_images)
    x0, y = images.batch(torch.arange(n), torch.Generator().manual_seed(cfg.train.seed))
    loss_fn, _ = make_objective(cfg)
    value = validation_loss(model.unet, loss_fn, x0, y if model.meta.class_names else None, seed=cfg.train.seed)
    return {"value": value, "images": n, "on": on, "seed": cfg.train.seed}


def run_evaluation(
    model: LoadedModel,
    train: Dataset,
    heldout: Dataset,
    cfg: EvaluateConfig,
    spec: SampleSpec,
    *,
    samplers: list[str],
    steps: list[int],
    inception: Path | None = None,
    n_inside: int = 4,
    show_progress: bool = True,
) -> EvaluationResult:
    """All of `sdpipe evaluate`'s numbers and pictures for `model`, judged against `heldout` (data the model
    never trained on) with features and classifiers fitted on `train`."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    scorer = make_scorer(train, heldout, cfg, inception)
    judge = fit_judge(train, heldout, cfg)
    timings["features_and_judge"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluation = evaluate_model(model, train, heldout, cfg, spec, show_progress, extra=scorer, judge=judge)
    default_pixels = scorer.seen[0]  # evaluate_model scores the default settings' first set first
    scorer.seen.clear()
    timings["default_and_guidance"] = time.perf_counter() - t

    t = time.perf_counter()
    sweep = steps_sweep(
        model,
        scorer,
        judge,
        evaluation["default"],
        spec,
        cfg,
        samplers,
        steps,
        show_progress,
    )
    timings["steps_sweep"] = time.perf_counter() - t

    t = time.perf_counter()
    samples = pixels_to_source(default_pixels, model.meta.value_range)
    memo = memorization(judge, samples)
    n_classes = len(model.meta.class_names or [])
    seeds = list(range(cfg.seed, cfg.seed + n_inside))
    labels = [i % n_classes for i in range(n_inside)] if n_classes else None
    traj, final = trajectory(model, spec, seeds, labels)
    maps = attention_maps(model, spec, seeds, labels)
    timings["inside"] = time.perf_counter() - t

    default = evaluation["default"]
    metrics = {
        "model": model.meta.weights_hash,
        "dataset_id": train.dataset_id,
        "heldout_dataset_id": heldout.dataset_id,
        "features": {"name": scorer.extractor.name, "description": scorer.extractor.description},
        "classifier": {
            "what": "the feature network's classification head, trained on the training part",
            "heldout_real_accuracy": scorer.classifier.heldout_accuracy,
            "accuracy": default.get("classifier_accuracy"),
            "per_class": default.get("classifier_accuracy_per_class"),
        },
        "memorization": memo,
        "evaluation": evaluation,
        "steps_sweep": sweep,
        "validation_loss": model_validation_loss(model),
        "inside": {"seeds": seeds, "labels": labels, "attention_layers": sorted(maps)},
        "timings_s": timings,
    }
    train_px = source_to_pixels(train.images, train.value_range)
    pairs = [(default_pixels[p["sample"]], train_px[p["train_index"]], p["distance"]) for p in memo["closest_pairs"]]
    pictures = {"pairs": pairs, "trajectory": traj, "final": final, "attention": maps}
    return EvaluationResult(metrics, pictures)
