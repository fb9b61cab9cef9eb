"""What `sdpipe evaluate` does, as a function: load a saved model and its data, evaluate, write the files.

User errors (a missing model, a bad setting, an unknown sampler, a missing or wrong Inception file) raise
`FileNotFoundError`, `ValueError` or `RuntimeError` with a message that names the input; the CLI prints it.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdpipe.config import DataConfig, validate_config
from sdpipe.data import Dataset
from sdpipe.data.imageset import has_split, split_arrays
from sdpipe.evaluate.full import DEFAULT_SAMPLERS, DEFAULT_STEPS, run_evaluation
from sdpipe.evaluate.report import write_evaluation_report
from sdpipe.models import LoadedModel, load_model
from sdpipe.sampler_names import PIXEL_SAMPLERS, resolve
from sdpipe.sampling import SampleSpec, make_scheduler


def parse_list(text: str, option: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']; an empty list is an error naming the option."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{option}: give at least one value, comma-separated")
    return items


def check_sweep(samplers: list[str], steps: list[str]) -> list[int]:
    """Validate the quality-versus-steps sweep's samplers and step counts; returns the step counts."""
    for name in samplers:
        try:
            resolve(name)
        except ValueError as exc:
            raise ValueError(f"--samplers: {exc}") from None
    try:
        counts = [int(s) for s in steps]
    except ValueError:
        raise ValueError(f"--steps: expected whole numbers like 5,10,20,50, got {','.join(steps)}") from None
    if any(not 1 <= c <= 1000 for c in counts):
        raise ValueError("--steps: every step count must be between 1 and 1000")
    return counts


def _applies(sampler: str, scheduler_config: dict) -> bool:
    try:
        make_scheduler(sampler, scheduler_config)
    except ValueError:
        return False
    return True


def judged_splits(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The training part and the held-out part (the test split) of the data `cfg` names, in memory."""
    if not has_split(cfg, "test"):
        raise ValueError(
            f"the model's data (data.source={cfg.source}) has no held-out test split, and every figure is measured "
            "against images the model did not train on: validate and train with --set data.test_fraction=0.25, "
            "or give the source a test/ folder"
        )
    return split_arrays(cfg, "train"), split_arrays(cfg, "test")


def _sweep_samplers(requested: list[str] | None, scheduler_config: dict, warnings: list[str]) -> list[str]:
    """The samplers of the quality-vs-steps table: those asked for (or the defaults) that the model takes."""
    names = requested if requested is not None else DEFAULT_SAMPLERS
    usable = [name for name in names if _applies(name, scheduler_config)]
    if requested is not None and not usable:
        takes = [name for name in PIXEL_SAMPLERS if _applies(name, scheduler_config)]
        raise ValueError(
            f"--samplers: none of {', '.join(requested)} applies to this model; it takes {', '.join(takes)}"
        )
    if requested is not None and usable != requested:  # e.g. ddim and unipc for an EDM-preconditioned model
        left_out = ", ".join(x for x in requested if x not in usable)
        warnings.append(f"samplers {left_out} do not apply to this model: left out of the steps sweep")
    return usable


def _split_warnings(model: LoadedModel, train: Dataset, heldout: Dataset) -> list[str]:
    recorded = model.meta.splits
    if recorded is None:
        return [
            f"the model records no held-out split (saved by an older sdpipe): it may have trained on some of the "
            f"{len(heldout.images)} images it is judged against"
        ]
    out = []
    if recorded.get("train") != train.dataset_id:
        out.append(f"training part {train.dataset_id} differs from the model's {recorded.get('train')}")
    if recorded.get("test") != heldout.dataset_id:
        out.append(f"held-out part {heldout.dataset_id} differs from the model's {recorded.get('test')}")
    return out


def evaluate_saved_model(
    model_dir: str | Path | LoadedModel,
    out: str | Path,
    *,
    n: int | None = None,
    data_source: str | None = None,
    inception: Path | None = None,
    samplers: list[str] | None = None,
    steps: list[int] | None = None,
    show_progress: bool = True,
) -> dict:
    """Evaluate the model at `model_dir` (or already loaded, e.g. resolved from the registry) against the
    held-out part of `data_source` (default: the data it was trained on, as its saved config names it) and
    write OUT/metrics.json and OUT/report.html; returns the metrics."""
    model = model_dir if isinstance(model_dir, LoadedModel) else load_model(model_dir)
    # only the sections evaluation uses, so models saved by older versions (other train keys) still load
    tree = {k: dict(model.meta.config.get(k, {})) for k in ("data", "sample", "evaluate")}
    if n is not None:
        tree["evaluate"]["n_samples"] = n
    if data_source is not None:
        tree["data"]["source"] = data_source
    cfg = validate_config(tree)  # --n and --data checked like any setting
    check_sweep(samplers or [], [str(s) for s in steps or DEFAULT_STEPS])
    warnings: list[str] = []
    sweep_samplers = _sweep_samplers(samplers, model.scheduler_config, warnings)
    train, heldout = judged_splits(cfg.data)
    warnings += _split_warnings(model, train, heldout)
    s = cfg.sample
    spec = SampleSpec(s.sampler, s.steps, s.guidance, s.micro_batch)  # the model's own sampling settings
    model.unet.eval()
    result = run_evaluation(
        model,
        train,
        heldout,
        cfg.evaluate,
        spec,
        samplers=sweep_samplers or [spec.sampler],
        steps=steps or DEFAULT_STEPS,
        inception=inception,
        show_progress=show_progress,
    )
    metrics = {"data_source": cfg.data.model_dump(mode="json"), **result.metrics}
    if warnings:
        metrics["warnings"] = warnings
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    title = f"sdpipe evaluate: {model.path.name} on {cfg.data.source}"
    write_evaluation_report(
        out / "report.html", title=title, metrics=metrics, pictures=result.pictures, config=model.meta.config
    )
    return metrics
