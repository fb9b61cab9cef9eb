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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import PartialState
from diffusers.models.unets.unet_2d import UNet2DModel

from sdpipe.config import PipelineConfig
from sdpipe.data import ImageSet, SourceChangedError, check_dataset, ensure_validated, load_dataset, open_split
from sdpipe.data.imageset import has_split, split_arrays
from sdpipe.evaluate.report import write_report
from sdpipe.evaluate.run import evaluate_model, fit_judge, sample_and_score
from sdpipe.models import LoadedModel, ModelMeta, load_model, save_model, weights_hash
from sdpipe.models.format import library_versions
from sdpipe.progress import progress_bar
from sdpipe.sampling import SampleSpec, generate, make_scheduler
from sdpipe.sampling.files import to_pixels
from sdpipe.train import TrainResult, sampler_config, train

if TYPE_CHECKING:
    from sdpipe.tabular.pipeline_config import TablePipelineConfig


class DataError(ValueError):
    """The data failed its check; the message lists every problem."""


def sample_spec(cfg: PipelineConfig) -> SampleSpec:
    s = cfg.sample
    return SampleSpec(s.sampler, s.steps, s.guidance, s.micro_batch)


def model_meta(cfg: PipelineConfig, data: ImageSet, weights: str) -> ModelMeta:
    """What `sdpipe.json` records of a model trained on `data` with `cfg`: among the rest, the content ids of
    its training split and of the held-out split it is judged against."""
    return ModelMeta(
        class_names=data.class_names,
        null_label=len(data.class_names) if data.class_names else None,
        image_size=data.image_shape[-1],
        channels=data.image_shape[0],
        value_range=data.value_range,
        dataset_id=data.dataset_id,
        splits={"train": data.split_id, **({"test": heldout_id(cfg)} if has_split(cfg.data, "test") else {})},
        preprocess=data.metadata()["preprocess"],
        weights_hash=weights,
        config=cfg.model_dump(mode="json"),
        versions=library_versions(),
    )


def heldout_id(cfg: PipelineConfig) -> str:
    return open_split(cfg.data, "test").split_id


def absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with data.path and data.validated_dir made absolute, so the config saved into the model and the
    checkpoints names the data wherever it is read from later."""
    update = {k: str(Path(v).resolve()) for k in ("path", "validated_dir") if (v := getattr(cfg.data, k))}
    if not update or cfg.data.source == "digits":
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=update)})


def training_evaluator(cfg: PipelineConfig, data: ImageSet) -> Callable[[UNet2DModel], dict] | None:
    """For `train.eval_every`: the judge's figures for `train.eval_samples` images from the weights in training
    (fixed seeds, the model's sampler), fitted on the training split and comparing with the held-out one."""
    if cfg.train.eval_every is None:
        return None
    if not data.class_names:
        raise ValueError("train.eval_every judges label accuracy too, so it needs labelled data")
    if not has_split(cfg.data, "test"):
        raise ValueError("train.eval_every judges against the held-out split: set data.test_fraction (e.g. 0.25)")
    judge = fit_judge(split_arrays(cfg.data, "train"), split_arrays(cfg.data, "test"), cfg.evaluate)
    meta = model_meta(cfg, data, "in-training")
    keys = ("fd_ratio", "two_sample_accuracy", "label_accuracy", "near_copy_share", "images_per_s")

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


def train_any(
    cfg: PipelineConfig | TablePipelineConfig,
    run_dir: str | Path,
    show_progress: bool = True,
    resume: bool = False,
    revalidate: bool = False,
) -> Any:
    """What `sdpipe train` runs: `train_model` for pixel-space models, `pipeline_t2i.train_t2i_model` for
    text-to-image ones, `tabular.pipeline.train_table` for table configs (`data.source: table`). Each result
    has `.model.path`, the saved RUN/model."""
    from sdpipe.tabular.pipeline_config import TablePipelineConfig

    if isinstance(cfg, TablePipelineConfig):
        from sdpipe.tabular.pipeline import train_table

        return train_table(cfg, run_dir, resume, show_progress, revalidate)
    if cfg.model.type == "text-to-image":
        from sdpipe.pipeline_t2i import train_t2i_model

        return train_t2i_model(absolute_paths(cfg), run_dir, show_progress, resume, revalidate)
    return train_model(cfg, run_dir, show_progress, resume, revalidate)


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
    cfg = absolute_paths(cfg)
    if cfg.model.type != "pixel":
        raise ValueError(f"train_model trains pixel-space models; model.type={cfg.model.type} goes to train_any")
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
            progress=lambda step, row: advance(1, _progress_text(row)),
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
    trained = TrainedModel(data, result, model, seconds)
    if processes.is_main_process:
        write_training_report(cfg, run_dir, trained)
    return trained


def _progress_text(row: dict) -> str:
    """The progress bar's line: the plain denoising loss (the optimized objective, with the learned weighting,
    is not a loss one can read: it goes negative)."""
    loss = row.get("denoising_loss", row["loss"])
    return f"denoising loss {loss:.4f}  {row['samples_per_s']:.0f} samples/s"


def training_metrics(cfg: PipelineConfig, result: TrainResult) -> dict:
    last = result.history[-50:]
    key = "denoising_loss" if all("denoising_loss" in r for r in last) else "loss"
    return {
        "steps": cfg.train.steps,
        "seconds": result.seconds,
        "samples_per_s": result.samples_per_second,
        f"final_{key}": sum(r[key] for r in last) / max(len(last), 1),
        "events": result.events,
    }


def write_training_report(cfg: PipelineConfig, run_dir: Path, trained: TrainedModel) -> Path:
    """RUN/report.html for every training run: the loss curve, training events, a grid of samples, the config
    (the demo writes a fuller one, with the judge's figures, over it)."""
    per_class = 8 if trained.model.meta.class_names else 32
    grid = sample_grid_pixels(trained.model, sample_spec(cfg), per_class=per_class, seed=0)
    rows = len(trained.model.meta.class_names or []) or 4
    return write_report(
        run_dir / "report.html",
        title=f"sdpipe train: {run_dir}",
        metrics={"model": trained.model.meta.weights_hash, "train": training_metrics(cfg, trained.result)},
        history=trained.result.history,
        grid_pixels=grid,
        grid_rows=rows,
        row_names=trained.model.meta.class_names,
        config=cfg.model_dump(mode="json"),
        timings=trained.seconds,
    )


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
    train_part, heldout = split_arrays(cfg.data, "train"), split_arrays(cfg.data, "test")
    timings = dict(trained.seconds)

    t = time.perf_counter()
    grid_pixels = sample_grid_pixels(model, sample_spec(cfg), per_class=10, seed=0)
    timings["sample_grid"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluation = evaluate_model(model, train_part, heldout, cfg.evaluate, sample_spec(cfg), show_progress)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    metrics = {
        "model": model.meta.weights_hash,
        "dataset_id": model.meta.dataset_id,
        "splits": model.meta.splits,
        "train": training_metrics(cfg, result),
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
        grid_rows=len(model.meta.class_names or []),
        row_names=model.meta.class_names,
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
