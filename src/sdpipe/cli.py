"""`sdpipe` command line: a thin typer layer over the stage functions (which the tests call directly)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sdpipe.config import ConfigError, PipelineConfig, load_config

app = typer.Typer(
    help="sdpipe: from a pile of data to a trained, evaluated diffusion model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (default: built-in defaults).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one setting, e.g. --set train.steps=500 (repeatable)."),
]
MODEL_HELP = "Model directory, or a registry reference: NAME, NAME@ALIAS (e.g. digits@production) or NAME:VERSION."
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _config(config: Path | None, overrides: list[str] | None) -> PipelineConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline on sklearn's digits: train, save, sample, evaluate, report (~5 min on 2 CPUs)."""
    from sdpipe.pipeline import DataError, run_demo

    cfg = _config(config, set_)
    try:
        result = run_demo(cfg, out, show_progress=not quiet)
    except DataError as exc:
        raise _fail(str(exc), 1) from None
    _print_summary(result.metrics, out)


@app.command()
def generate(
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and samples.jsonl.")],
    label: Annotated[str, typer.Option(help="Class to draw (e.g. 0..9), or 'all' to cycle through classes.")] = "all",
    n: Annotated[int, typer.Option(help="Number of images.")] = 10,
    seed: Annotated[int, typer.Option(help="Image i uses seed S+i: same seed, same image.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Sampling steps (default: the model's sample.steps).")] = None,
    sampler: Annotated[
        str | None, typer.Option(help="ddpm, ddim, euler, heun, dpmpp_2m, dpmpp_2m_karras, unipc.")
    ] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale; 1 = none.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images held in memory at once; never changes an image.")] = 1000,
    quiet: QuietOpt = False,
) -> None:
    """Generate images from a saved model: OUT/00000.png, ... and OUT/samples.jsonl."""
    from sdpipe.sampling.files import generate_files

    loaded = _load(model)
    spec = _spec(loaded, steps, sampler, guidance)
    try:
        records = generate_files(
            loaded, out, label=label, n=n, seed=seed, spec=spec, batch_size=batch_size, show_progress=not quiet
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    out_console.print(f"wrote {len(records)} images and samples.jsonl to {out}")


@app.command()
def replay(
    image: Annotated[Path, typer.Argument(help="A PNG written by sdpipe generate.")],
    out: Annotated[Path, typer.Option(help="Folder for the regenerated image.")],
    model: Annotated[
        str | None, typer.Option(help="Model directory or registry reference, if not the one it names.")
    ] = None,
) -> None:
    """Regenerate an image bit for bit from the generation parameters stored in its PNG."""
    from sdpipe.sampling.files import replay as replay_image

    try:
        path = replay_image(image, out, _resolve(model) if model else None)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    out_console.print(f"regenerated {image} as {path}")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints/, metrics.jsonl, model/.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUT's last checkpoint, ending with the uninterrupted run's weights.")
    ] = False,
    revalidate: Annotated[
        bool, typer.Option(help="Validate data.path into data.validated_dir again first (when the source changed).")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model from a config and save it to OUT/model (checkpoints in OUT/checkpoints)."""
    from sdpipe.pipeline import DataError, train_model

    cfg = _config(config, set_)
    try:
        trained = train_model(cfg, out, show_progress=not quiet, resume=resume, revalidate=revalidate)
    except DataError as exc:
        raise _fail(str(exc), 1) from None
    except ValueError as exc:  # e.g. resuming with other settings than the run's
        raise _fail(str(exc)) from None
    out_console.print(f"model saved to {trained.model.path}")


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    out: Annotated[Path, typer.Option(help="Folder for metrics.json and report.html.")],
    n: Annotated[int | None, typer.Option(help="Number of generated images to judge.")] = None,
    data: Annotated[str | None, typer.Option(help="Data source (default: the model's own training data).")] = None,
    inception: Annotated[
        Path | None, typer.Option(help="pt_inception-2015-12-05-6726825d.pth for Inception features (sha256-checked).")
    ] = None,
    samplers: Annotated[
        str | None,
        typer.Option(
            help="Samplers of the quality-vs-steps table [default: those of ddim,euler,dpmpp_2m,unipc the model takes]."
        ),
    ] = None,
    steps: Annotated[str, typer.Option(help="Step counts of the quality-vs-steps table.")] = "5,10,20,50",
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a saved model: FID/KID/precision/recall, per-class accuracy, memorization, quality vs steps."""
    from sdpipe.evaluate.command import check_sweep, evaluate_saved_model, parse_list

    try:
        names = None if samplers is None else parse_list(samplers, "--samplers")
        counts = check_sweep(names or [], parse_list(steps, "--steps"))
        metrics = evaluate_saved_model(
            _resolve(model),
            out,
            n=n,
            data_source=data,
            inception=inception,
            samplers=names,
            steps=counts,
            show_progress=not quiet,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    for warning in metrics.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {warning}")
    d = metrics["evaluation"]["default"]
    out_console.print(
        f"FID {d['fid']:.4g}, KID {d['kid_mean']:.3g} ± {d['kid_std']:.2g}, precision {d['precision']:.3f}, "
        f"recall {d['recall']:.3f} in features {metrics['features']['name']}"
    )
    _print_summary(metrics, out)


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Validate a config (file + --set overrides) and print the full result as YAML."""
    import yaml

    cfg = _config(config, set_)
    out_console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False)


def _load(ref: str):
    """A model from a folder or a registry reference; a registry version's weights hash is checked."""
    from sdpipe.registry import load

    try:
        return load(ref)
    except (FileNotFoundError, ValueError) as exc:  # RegistryError is a ValueError
        raise _fail(str(exc)) from None


def _resolve(ref: str) -> Path:
    from sdpipe.registry import resolve

    try:
        return resolve(ref)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _spec(loaded, steps: int | None, sampler: str | None, guidance: float | None):
    """The model's own sampling settings (its measured best), with the options given on the command line."""
    from sdpipe.sampling.generate import model_sample_spec

    try:
        return model_sample_spec(loaded.meta.config, loaded.scheduler_config, steps, sampler, guidance)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _print_summary(metrics: dict, out: Path) -> None:
    table = Table(title=f"sdpipe results ({out})")
    for col in ("sampler", "steps", "guidance", "FD ratio", "accuracy", "copies", "img/s"):
        table.add_column(col, justify="right")
    for r in metrics["evaluation"]["guidance_sweep"]:
        table.add_row(
            r["sampler"],
            str(r["steps"]),
            f"{r['guidance']:g}",
            f"{r['fd_ratio']:.3f}",
            f"{r.get('label_accuracy', float('nan')):.1%}",
            f"{r['near_copy_share']:.1%}",
            f"{r['images_per_s']:.0f}",
        )
    out_console.print(table)
    judge = metrics["evaluation"].get("judge", {})
    if "copied_training_images_fd_ratio" in judge and "heldout_real_fd_ratio" in judge:
        copies = judge["copied_training_images_fd_ratio"]
        out_console.print(
            f"FD ratio for scale: random training images themselves {copies['mean']:.2f} (one set: "
            f"{copies['min']:.2f}-{copies['max']:.2f}), new real images {judge['heldout_real_fd_ratio']:.2f}"
        )
    if "timings_s" in metrics:
        out_console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["timings_s"].items()))
    out_console.print(
        f"report: {out / 'report.html'}" if (out / "report.html").exists() else f"metrics: {out / 'metrics.json'}"
    )


# Command groups defined in their stage's package, one line each (e.g. `app.add_typer(data_app, name="data")`).
# --- stage commands: begin ---
from sdpipe.data.cli import app as data_app  # noqa: E402

app.add_typer(data_app, name="data")
from sdpipe.registry.cli import app as registry_app  # noqa: E402

app.add_typer(registry_app, name="registry")
from sdpipe.serve.cli import serve as serve_command  # noqa: E402

app.command("serve")(serve_command)
# --- stage commands: end ---


def main() -> None:
    app()


if __name__ == "__main__":
    main()
