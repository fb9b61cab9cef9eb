"""The whole pipeline in order: data -> check -> train -> save -> sample grid -> evaluate -> report.

`train_model` is what `sdpipe train` calls and `run_demo` what `sdpipe demo` calls; each step is a function
of its stage's package. The demo's run folder holds train metrics.jsonl and checkpoints/ as well.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from diffusers.models.unets.unet_2d import UNet2DModel

from sdpipe.config import PipelineConfig
from sdpipe.data import (
    ImageSet,
    SourceChangedError,
    check_dataset,
    ensure_validated,
    load_dataset,
    open_split,
    to_source_range,
)
from sdpipe.evaluate.judge import Judge
from sdpipe.evaluate.report import write_report
from sdpipe.evaluate.run import evaluate_model, sample_and_score
from sdpipe.models import LoadedModel, ModelMeta, load_model, save_model, weights_hash
from sdpipe.models.format import library_versions
from sdpipe.progress import progress_bar
from sdpipe.sampling import SampleSpec, generate, make_scheduler
from sdpipe.sampling.files import to_pixels
from sdpipe.train import TrainResult, sampler_config, train


class DataError(ValueError):
    """The data failed its check; the message lists every problem."""


def sample_spec(cfg: PipelineConfig) -> SampleSpec:
    s = cfg.sample
    return SampleSpec(s.sampler, s.steps, s.guidance, s.micro_batch)


def model_meta(cfg: PipelineConfig, data: ImageSet, weights: str) -> ModelMeta:
    """What `sdpipe.json` records of a model trained on `data` with `cfg`."""
    return ModelMeta(
        class_names=data.class_names,
        null_label=len(data.class_names) if data.class_names else None,
        image_size=data.image_shape[-1],
        channels=data.image_shape[0],
        value_range=data.value_range,
        dataset_id=data.dataset_id,
        preprocess=data.metadata()["preprocess"],
        weights_hash=weights,
        config=cfg.model_dump(mode="json"),
        versions=library_versions(),
    )


def training_evaluator(cfg: PipelineConfig, data: ImageSet) -> Callable[[UNet2DModel], dict] | None:
    """For `train.eval_every`: the judge's FD ratio, label accuracy and near-copy share of
    `train.eval_samples` images from the weights in training (fixed seeds, the model's sampler). The judge is
    fitted on (up to 5000 of) the training images."""
    if cfg.train.eval_every is None:
        return None
    if not data.class_names:
        raise ValueError("train.eval_every judges label accuracy too, so it needs labelled data")
    x, y = data.batch(torch.arange(min(len(data), 5000)), torch.Generator().manual_seed(cfg.evaluate.seed))
    judge = Judge.fit(
        to_source_range(x, data.value_range).numpy(),
        y.numpy(),
        pca_components=cfg.evaluate.pca_components,
        seed=cfg.evaluate.seed,
    )
    meta = model_meta(cfg, data, "in-training")
    keys = ("fd_ratio", "label_accuracy", "near_copy_share", "images_per_s")

    def evaluate(unet: UNet2DModel) -> dict:
        model = LoadedModel(Path("."), unet, sampler_config(cfg), meta)
        scores = sample_and_score(model, judge, sample_spec(cfg), cfg.train.eval_samples, cfg.evaluate.seed, False)
        return {k: scores[k] for k in keys if k in scores}

    return evaluate


@dataclass
class TrainedModel:
    data: ImageSet  # the training split
    result: TrainResult
    model: LoadedModel  # as loaded back from disk
    seconds: dict[str, float]


def train_model(
    cfg: PipelineConfig,
    run_dir: str | Path,
    show_progress: bool = True,
    resume: bool = False,
    revalidate: bool = False,
) -> TrainedModel:
    """Check the data (digits: in memory; other sources: unchanged since `sdpipe data validate`, or validated
    again with `revalidate`), train (or, with `resume`, continue from RUN's last checkpoint), and save the
    model to RUN/model in the diffusers-based format."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    if cfg.data.source == "digits":
        check = check_dataset(load_dataset(cfg.data))
        if not check.ok:
            raise DataError("data check failed:\n  " + "\n  ".join(check.problems))
    try:
        ensure_validated(cfg.data, revalidate, show_progress)
    except SourceChangedError as exc:
        raise DataError(f"{exc}\n(or train with --revalidate)") from None
    data = open_split(cfg.data, "train")
    if data.image_shape[1] != data.image_shape[2]:  # the model format (and UNet2DModel's config) is square
        raise DataError(f"images are {data.image_shape[2]}x{data.image_shape[1]}: set data.resolution to train square")
    validating = cfg.train.validate_every is not None and cfg.data.validation_fraction > 0
    validation = open_split(cfg.data, "validation") if validating else None
    seconds = {"data": time.perf_counter() - t0}

    t = time.perf_counter()
    # one process unless launched with torchrun / accelerate launch; cpu=True as the training loop's
    # Accelerator says it, or a CPU-only machine would not see the other processes
    processes = PartialState(cpu=not torch.cuda.is_available())
    with progress_bar("training", cfg.train.steps, show_progress and processes.is_main_process) as advance:
        result = train(
            cfg,
            data,
            run_dir,
            progress=lambda step, row: advance(1, f"loss {row['loss']:.4f}  {row['samples_per_s']:.0f} samples/s"),
            resume=resume,
            validation=validation,
            evaluator=training_evaluator(cfg, data),
        )
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    sampler = make_scheduler(cfg.sample.sampler, sampler_config(cfg))
    meta = model_meta(cfg, data, weights_hash(result.unet))
    if processes.is_main_process:
        save_model(run_dir / "model", result.unet, sampler, meta)
    processes.wait_for_everyone()
    model = load_model(run_dir / "model")  # everything after this uses the model exactly as saved
    seconds["save"] = time.perf_counter() - t
    return TrainedModel(data, result, model, seconds)


@dataclass
class DemoResult:
    out: Path
    metrics: dict


def run_demo(cfg: PipelineConfig, out: str | Path, show_progress: bool = True) -> DemoResult:
    """Train, save, sample and evaluate; writes OUT/model/, OUT/metrics.json and OUT/report.html."""
    if cfg.data.source != "digits":
        raise DataError(
            f"sdpipe demo runs on the embedded digits; for data.source={cfg.data.source} use "
            "`sdpipe train` then `sdpipe evaluate`"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trained = train_model(cfg, out, show_progress)
    model, result = trained.model, trained.result
    data = load_dataset(cfg.data)  # the whole set: what the judge compares samples with
    timings = dict(trained.seconds)

    t = time.perf_counter()
    grid_pixels = sample_grid_pixels(model, sample_spec(cfg), per_class=10, seed=0)
    timings["sample_grid"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluation = evaluate_model(model, data, cfg.evaluate, sample_spec(cfg), show_progress)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    metrics = {
        "model": model.meta.weights_hash,
        "dataset_id": data.dataset_id,
        "train": {
            "steps": cfg.train.steps,
            "seconds": result.seconds,
            "samples_per_s": result.samples_per_second,
            "final_loss": sum(r["loss"] for r in result.history[-50:]) / len(result.history[-50:]),
            "events": result.events,
        },
        "evaluation": evaluation,
        "timings_s": timings,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(
        out / "report.html",
        title=f"sdpipe demo: {cfg.data.source}",
        metrics=metrics,
        history=result.history,
        grid_pixels=grid_pixels,
        grid_rows=len(data.class_names),
        row_names=data.class_names,
        config=cfg.model_dump(mode="json"),
        timings=timings,
    )
    return DemoResult(out, metrics)


def sample_grid_pixels(model: LoadedModel, spec: SampleSpec, per_class: int, seed: int) -> np.ndarray:
    """`per_class` images of every class, class by class, as uint8 pixels."""
    names = model.meta.class_names or [""]
    labels = [c for c in range(len(names)) for _ in range(per_class)] if model.meta.class_names else None
    n = len(names) * per_class
    x = generate(
        model.unet,
        model.scheduler_config,
        list(range(seed, seed + n)),
        labels,
        shape=(model.meta.channels, model.meta.image_size, model.meta.image_size),
        null_label=model.meta.null_label,
        spec=spec,
    )
    return to_pixels(x, model.meta.value_range)
