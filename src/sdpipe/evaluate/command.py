"""What `sdpipe evaluate` does, as a function: load a saved model and its data, evaluate, write the files.

User errors (a missing model, a bad setting, an unknown sampler, a missing or wrong Inception file) raise
`FileNotFoundError`, `ValueError` or `RuntimeError` with a message that names the input; the CLI prints it.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdpipe.config import validate_config
from sdpipe.data import load_dataset
from sdpipe.evaluate.full import DEFAULT_SAMPLERS, DEFAULT_STEPS, run_evaluation
from sdpipe.evaluate.report import write_evaluation_report
from sdpipe.models import LoadedModel, load_model
from sdpipe.sampling import SAMPLERS, SampleSpec, make_scheduler


def parse_list(text: str, option: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']; an empty list is an error naming the option."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{option}: give at least one value, comma-separated")
    return items


def check_sweep(samplers: list[str], steps: list[str]) -> list[int]:
    """Validate the quality-versus-steps sweep's samplers and step counts; returns the step counts."""
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad:
        raise ValueError(f"--samplers: unknown {', '.join(bad)}; choose from {', '.join(SAMPLERS)}")
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
    """Evaluate the model at `model_dir` (or already loaded, e.g. resolved from the registry) against
    `data_source` (default: the data it was trained on) and write OUT/metrics.json and OUT/report.html;
    returns the metrics."""
    model = model_dir if isinstance(model_dir, LoadedModel) else load_model(model_dir)
    # only the sections evaluation uses, so models saved by older versions (other train keys) still load
    tree = {k: dict(model.meta.config.get(k, {})) for k in ("data", "sample", "evaluate")}
    if n is not None:
        tree["evaluate"]["n_samples"] = n
    if data_source is not None:
        tree["data"]["source"] = data_source
    cfg = validate_config(tree)  # --n and --data checked like any setting
    requested = samplers is not None
    samplers = samplers if samplers is not None else DEFAULT_SAMPLERS
    steps = steps or DEFAULT_STEPS
    check_sweep(samplers, [str(s) for s in steps])
    data = load_dataset(cfg.data)
    s = cfg.sample
    spec = SampleSpec(s.sampler, s.steps, s.guidance, s.micro_batch)  # the model's own sampling settings
    warnings = []
    usable = [name for name in samplers if _applies(name, model.scheduler_config)]
    if requested and usable != samplers:  # e.g. ddim and unipc for an EDM-preconditioned model
        left_out = ", ".join(x for x in samplers if x not in usable)
        warnings.append(f"samplers {left_out} do not apply to this model: left out of the steps sweep")
    samplers = usable or [spec.sampler]
    model.unet.eval()
    result = run_evaluation(
        model,
        data,
        cfg.evaluate,
        spec,
        samplers=samplers,
        steps=steps,
        inception=inception,
        show_progress=show_progress,
    )
    metrics = {"data_source": cfg.data.model_dump(mode="json"), **result.metrics}
    if data.dataset_id != model.meta.dataset_id:
        warnings.append(f"data {data.dataset_id} differs from the model's training data {model.meta.dataset_id}")
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
