"""`sdpipe` command line: a thin typer layer over the stage functions (which the tests call directly).

Every user error (bad input, a bad setting, a missing file, a folder that cannot be used as asked) stops the
command with one `error: ...` line on stderr and exit status 2, before any work where it can be seen then.
A training run stopped by SIGINT/SIGTERM exits 130/143 after a checkpoint, printing how to resume it.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from sdpipe import sampler_names
from sdpipe.config import MAX_SEED, PipelineConfig, load_config

if TYPE_CHECKING:
    from sdpipe.conditioning import LoraRef
    from sdpipe.models.kinds import AnyModel
    from sdpipe.models.pipelines import LoadedPipeline
    from sdpipe.sampling import SampleSpec
    from sdpipe.train import TrainingInterrupted

app = typer.Typer(
    help="sdpipe: from a pile of data to a trained, evaluated diffusion model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (default: built-in defaults).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one setting, e.g. --set train.steps=500 (repeatable)."),
]
MODEL_HELP = "Model directory, or a registry reference: NAME, NAME@ALIAS (e.g. digits@production) or NAME:VERSION."
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
RunOverwriteOpt = Annotated[
    bool, typer.Option(help="Remove the run already in OUT (checkpoints, metrics, model, report) before training.")
]
ImagesOverwriteOpt = Annotated[bool, typer.Option(help="Remove the PNGs and samples.jsonl already in OUT first.")]
# what a user can get wrong: a bad value or setting (ConfigError, DataError, RegistryError are ValueErrors),
# a missing or unusable file or folder (OSError)
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError, MemoryError)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


@contextmanager
def _user_errors(*more: type[Exception]) -> Iterator[None]:
    """Turn a user error raised inside into one `error:` line and exit 2 (typer's own exits pass through:
    click's Exit is a RuntimeError, which `evaluate` counts among its user errors)."""
    try:
        yield
    except typer.Exit:
        raise
    except (*USER_ERRORS, *more) as exc:
        raise _fail(str(exc)) from None


def _config(config: Path | None, overrides: list[str] | None, base: dict | None = None) -> PipelineConfig:
    with _user_errors():
        return load_config(config, overrides, base=base)


@contextmanager
def _training() -> Iterator[None]:
    """A run stopped by a signal: where it stopped and how to resume (exit 128 + signal); diverged: exit 1."""
    from sdpipe.train import TrainingInterrupted

    try:
        yield
    except TrainingInterrupted as exc:
        raise _interrupted(exc) from None
    except FloatingPointError as exc:  # the run diverged past what rollbacks could mend
        raise _fail(str(exc), 1) from None


def _interrupted(exc: TrainingInterrupted) -> typer.Exit:
    if os.environ.get("RANK", "0") == "0":  # one process says it
        command = f"sdpipe train --out {shlex.quote(str(exc.run_dir))} --resume"
        err_console.print(f"interrupted: {exc}", markup=False, highlight=False)
        err_console.print(f"resume with: {command}", markup=False, highlight=False)
    return typer.Exit(exc.exit_code)


@app.command()
def demo(
    which: Annotated[
        str,
        typer.Argument(
            help="digits: class-conditional pixel diffusion on sklearn's digits. shapes: a text-to-image model "
            "trained from scratch on rendered captioned shapes, judged per caption kind. shapes-lora: a LoRA that "
            "tries to teach the shapes model (--base) a new shape from 50 images, judged before and after."
        ),
    ] = "digits",
    out: Annotated[
        Path | None, typer.Option(help="Output folder [default: runs/demo, runs/shapes or runs/shapes-lora].")
    ] = None,
    base: Annotated[
        Path | None, typer.Option(help="shapes-lora: the output folder of `sdpipe demo shapes` [default: runs/shapes].")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Remove an earlier demo's outputs in OUT first (its run; for shapes also its data and figures, "
            "keeping the content-keyed cache)."
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline on an embedded data set: train, save, sample, evaluate, report (digits ~5 min,
    shapes ~15 min on 2 CPUs)."""
    from sdpipe.train.run_dir import claim_demo_dir, claim_run_dir

    if which not in ("digits", "shapes", "shapes-lora"):
        raise typer.BadParameter(f"{which!r}: choose digits, shapes or shapes-lora", param_hint="WHICH")
    if base is not None and which != "shapes-lora":
        raise typer.BadParameter("--base is for shapes-lora only", param_hint="--base")
    if which != "digits" and (config is not None or set_):
        module = "sdpipe.demo_shapes" + ("_lora" if which == "shapes-lora" else "")
        raise typer.BadParameter(f"the {which} demo has fixed settings (see {module})", param_hint="--config/--set")
    if which == "shapes-lora":
        from sdpipe.demo_shapes_lora import run_shapes_lora_demo

        folder, base = out or Path("runs/shapes-lora"), base or Path("runs/shapes")
        with _user_errors(), _training():
            claim_demo_dir(folder, overwrite, base)
            metrics = run_shapes_lora_demo(base, folder, show_progress=not quiet)
        _print_lora_summary(metrics, folder)
        return
    if which == "shapes":
        from sdpipe.demo_shapes import run_shapes_demo

        folder = out or Path("runs/shapes")
        with _user_errors(), _training():
            claim_demo_dir(folder, overwrite)
            metrics = run_shapes_demo(folder, show_progress=not quiet)
        _print_shapes_summary(metrics, folder)
        return
    from sdpipe.pipeline import run_demo

    cfg = _config(config, set_)
    folder = out or Path("runs/demo")
    with _user_errors(), _training():
        claim_run_dir(folder, resume=False, overwrite=overwrite, resumable=False)  # the demo has no --resume
        result = run_demo(cfg, folder, show_progress=not quiet)
    _print_summary(result.metrics, folder)


def _given(options: dict[str, Any]) -> list[str]:
    """The names of `options` the user set (not None, False, 0 or empty): for refusing options that do not apply."""
    return [name for name, value in options.items() if value not in (None, False, "", [])]


def _print_lora_summary(metrics: dict, out: Path) -> None:
    from sdpipe.evaluate.intervals import fmt

    out_console.print(f"{'group':<18} {'base':<22} {'with the LoRA':<22} change (points)")
    for name, g in metrics["judge"].items():
        before, after = fmt(g["before"], 1, percent=True), fmt(g["after"], 1, percent=True)
        out_console.print(f"{name:<18} {before:<22} {after:<22} {fmt(g['change_points'], 1)}")
    out_console.print(f"training {metrics['seconds']['train']:.0f} s; metrics: {out / 'metrics.json'}")


def _print_shapes_summary(metrics: dict, out: Path) -> None:
    from sdpipe.evaluate.intervals import fmt

    for name, group in metrics["judge"].items():
        if group.get("share"):
            out_console.print(f"{name:<18} {fmt(group['share'], 1, percent=True)}  (n={group['n']})")
    out_console.print(f"total {metrics['seconds']['total']:.0f} s; report: {out / 'report.html'}")


def _check_seeds(seed: int, n: int) -> None:
    """Seeds are 0..MAX_SEED, as the server and the config take them: none may wrap around."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed {seed}: seeds are whole numbers from 0 to {MAX_SEED}")
    if seed + max(n, 1) - 1 > MAX_SEED:
        raise ValueError(f"--seed {seed} --n {n}: image i takes seed {seed}+i, past {MAX_SEED}; lower --seed or --n")


def _images_folder(out: Path, overwrite: bool) -> None:
    """Refuse to write images into a file or among earlier ones (samples.jsonl would list only the new);
    with `overwrite`, remove the earlier images and samples.jsonl, and refuse a folder holding anything else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder (a new or an empty one)")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise ValueError(f"--out {out} is not empty: choose a new folder, or pass --overwrite to clear it first")
    ours = [p for p in entries if p.is_file() and (p.suffix == ".png" or p.name == "samples.jsonl")]
    others = [p.name for p in entries if p not in ours]
    if others:
        raise ValueError(
            f"--overwrite clears only PNGs and samples.jsonl, and {out} holds {', '.join(others[:3])}"
            f"{' ...' if len(others) > 3 else ''} as well: choose a new folder"
        )
    for path in ours:
        path.unlink()


@app.command()
def generate(
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    out: Annotated[
        Path,
        typer.Option(help="Folder for the PNGs and samples.jsonl (new or empty); table models: a .csv/.parquet file."),
    ],
    label: Annotated[
        str | None, typer.Option(help="Pixel-space class models: class to draw (e.g. 0..9), or 'all' to cycle.")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="Text-to-image models: the prompt of every image.")] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Text-to-image models: a file of prompts, one a line; image i takes line i.")
    ] = None,
    negative_prompt: Annotated[str, typer.Option(help="What the images should not show (text-to-image).")] = "",
    width: Annotated[int | None, typer.Option(help="Image width, a multiple of 8 (default: the model's).")] = None,
    height: Annotated[int | None, typer.Option(help="Image height, a multiple of 8 (default: the model's).")] = None,
    n: Annotated[int, typer.Option(help="Number of images.")] = 10,
    seed: Annotated[int, typer.Option(help=f"Image i uses seed S+i (0..{MAX_SEED}): same seed, same image.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Sampling steps (default: the model's).")] = None,
    sampler: Annotated[str | None, typer.Option(help=f"By either name: {sampler_names.choices()}.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance (CFG) scale; 1 = none.")] = None,
    clip_skip: Annotated[int, typer.Option(help="Text-to-image: text-encoder layers to skip, web-UI style.")] = 1,
    image: Annotated[Path | None, typer.Option(help="img2img/inpainting: the input image (PNG, JPEG, WebP).")] = None,
    strength: Annotated[
        float | None, typer.Option(help="How much of --image to repaint, (0, 1] (default 0.8; 1.0 with --mask).")
    ] = None,
    mask: Annotated[Path | None, typer.Option(help="Inpainting: white = repaint, black = keep (with --image).")] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(help="A LoRA: FILE[:WEIGHT] or a registry NAME@ALIAS[:WEIGHT] (default weight 1; repeatable)."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or mps.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 (text-to-image models).")] = "float32",
    micro_batch: Annotated[
        int | None, typer.Option(help="Rows the network runs at once (default: the model's); part of an image's bits.")
    ] = None,
    single_file_config: Annotated[
        str | None,
        typer.Option(
            "--config", help="A single-file checkpoint's config: sd15, sd2-v, sd2-base, sdxl-base, ... or a folder."
        ),
    ] = None,
    vae_tiling: Annotated[bool, typer.Option(help="Decode in tiles: for sizes whose decode would not fit.")] = False,
    attention_slicing: Annotated[bool, typer.Option(help="Attention in slices: less memory, a little slower.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images held in memory at once; never changes an image.")] = 1000,
    condition: Annotated[
        list[str] | None,
        typer.Option(help="Table models: COLUMN=VALUE that every row carries, the rest drawn given it (repeatable)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Remove the PNGs and samples.jsonl already in OUT first (table models: replace OUT).")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate images from a saved model: OUT/00000.png, ... and OUT/samples.jsonl; or, from a table model,
    --n rows into OUT (.csv or .parquet; row i takes seed S+i, so the same seed gives the same rows whatever n).

    A pixel-space class model takes --label; a Stable Diffusion model (a diffusers folder or one .safetensors
    file) takes --prompt or --prompts. Image i's noise comes from its own CPU generator seeded S+i, so it is the
    same whatever --n and --batch-size."""
    from sdpipe.models.pipelines import LoadedPipeline
    from sdpipe.sampling.files import generate_files

    with _user_errors():
        from sdpipe.tabular.commands import generate_command, table_model_path

        if (table := table_model_path(model)) is not None:
            given = _given({"--label": label, "--prompt": prompt, "--prompts": prompts, "--width": width,
                            "--height": height, "--steps": steps, "--sampler": sampler, "--guidance": guidance,
                            "--image": image, "--strength": strength, "--mask": mask, "--lora": lora,
                            "--config": single_file_config, "--micro-batch": micro_batch,
                            "--negative-prompt": negative_prompt, "--vae-tiling": vae_tiling,
                            "--attention-slicing": attention_slicing})  # fmt: skip
            line = generate_command(table, out, n, seed, condition or [], overwrite, device, dtype, given)
            out_console.print(line, markup=False, highlight=False)
            return
        if condition:
            raise ValueError("--condition is for table models; image models take --label or --prompt")
        _check_seeds(seed, n)
        _images_folder(out, overwrite)
        loaded = _load(model, device, dtype, single_file_config)
        conditions = None
        if isinstance(loaded, LoadedPipeline):
            from sdpipe.inputs import register_file
            from sdpipe.sampling.sd_records import prompt_conditions, read_prompts

            loaded.save_memory(vae_tiling, attention_slicing)
            loaded.parts.resolve_lora = _registry_lora
            loras = _loras(loaded, lora or [])

            if label is not None:
                raise ValueError("a text-to-image model takes --prompt or --prompts, not --label")
            texts = read_prompts(prompt, None if prompts is None else str(prompts))
            conditions = prompt_conditions(
                loaded,
                texts,
                n,
                negative_prompt=negative_prompt,
                width=width,
                height=height,
                clip_skip=clip_skip,
                init=None if image is None else register_file(image, "--image"),
                mask=None if mask is None else register_file(mask, "--mask"),
                strength=strength,
                loras=loras,
            )
        elif lora:
            raise ValueError("--lora applies to Stable Diffusion models, not pixel-space class models")
        elif any(v is not None for v in (prompt, prompts, width, height, image, mask, strength)) or vae_tiling:
            raise ValueError("a pixel-space class model takes --label, not prompts or sizes")
        spec = _spec(loaded, steps, sampler, guidance, micro_batch)
        records = generate_files(
            loaded,
            out,
            label=label or "all",
            n=n,
            seed=seed,
            spec=spec,
            conditions=conditions,
            batch_size=batch_size,
            show_progress=not quiet,
        )
    out_console.print(f"wrote {len(records)} images and samples.jsonl to {out}")


@app.command()
def impute(
    model: Annotated[str, typer.Option(help="A table model: " + MODEL_HELP)],
    input_: Annotated[Path, typer.Option("--input", help="Rows with missing cells: a .csv or .parquet file.")],
    out: Annotated[
        Path,
        typer.Option(
            help="The filled rows (.csv or .parquet); OUT's name with .intervals.csv (FILLED.csv -> "
            "FILLED.intervals.csv, beside it) gets one line per filled cell: row (1-based), column, value, "
            "low and high (numbers: the 2.5 % and 97.5 % draws), shares (categories: JSON share of each value)."
        ),
    ],
    draws: Annotated[int, typer.Option(help="Draws per row; a number is their median, a category their mode.")] = 10,
    seed: Annotated[int, typer.Option(help=f"Draw k of row j uses seed S + j*K + k (0..{MAX_SEED}).")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or mps.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT and its .intervals.csv if they exist.")] = False,
) -> None:
    """Fill the missing cells of a table with a table model, each row drawn --draws times given its observed
    cells (which stay exactly as they are); writes OUT and OUT's .intervals.csv."""
    from sdpipe.tabular.commands import impute_command

    with _user_errors():
        line = impute_command(model, input_, out, draws, seed, overwrite, device)
    out_console.print(line, markup=False, highlight=False)


@app.command()
def replay(
    image: Annotated[Path, typer.Argument(help="A PNG written by sdpipe generate.")],
    out: Annotated[Path, typer.Option(help="Folder for the regenerated image (new or empty).")],
    model: Annotated[
        str | None, typer.Option(help="Model directory or registry reference, if not the one it names.")
    ] = None,
    overwrite: ImagesOverwriteOpt = False,
) -> None:
    """Regenerate an image bit for bit from the generation parameters stored in its PNG."""
    from sdpipe.sampling.files import replay as replay_image

    with _user_errors():
        if not image.is_file():
            raise FileNotFoundError(f"image not found: {image}")
        _images_folder(out, overwrite)
        loaded = None if model is None else _load(model)  # a registry version's weights hash is checked
        path = replay_image(image, out, loaded)  # the model as loaded and checked, not loaded a second time
    out_console.print(f"regenerated {image} as {path}")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Run folder: config.yaml, checkpoints/, metrics.jsonl, model/.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run in OUT from its last checkpoint, with its saved config (--set on top), "
            "ending with the uninterrupted run's weights."
        ),
    ] = False,
    overwrite: RunOverwriteOpt = False,
    revalidate: Annotated[
        bool, typer.Option(help="Validate data.path into data.validated_dir again first (when the source changed).")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model from a config and save it to OUT/model (checkpoints in OUT/checkpoints). A config whose
    data.source is `table` (examples/table.yaml) trains a table model on data.path, validated into
    data.validated_dir (validated first when that folder holds no validation)."""
    from sdpipe.pipeline import train_any
    from sdpipe.tabular.pipeline_config import load_train_config
    from sdpipe.train.run_dir import claim_run_dir

    with _user_errors(), _training():
        if resume:
            claim_run_dir(out, resume=True, overwrite=overwrite)  # the folder must hold a run
        # an image config, or a table one (data.source: table); checked before --overwrite removes anything
        cfg = load_train_config(config, set_, run_dir=out if resume else None)
        if not resume:
            claim_run_dir(out, resume=False, overwrite=overwrite)
        trained = train_any(cfg, out, show_progress=not quiet, resume=resume, revalidate=revalidate)
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
    prompts: Annotated[
        Path | None, typer.Option(help="Text-to-image models: the prompts to judge, one a line (a grid per prompt).")
    ] = None,
    clip: Annotated[
        Path | None, typer.Option(help="Text-to-image: a local CLIP model folder (transformers) for the CLIP score.")
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="Text-to-image: a folder of real images for FID/KID (with its own floor).")
    ] = None,
    held_out: Annotated[
        bool,
        typer.Option(
            "--held-out",
            help="Text-to-image models sdpipe trained on a labelled captioned folder: sample the held-out split's "
            "captions (4 sets) and judge them with a judge fitted on the real training images: prompt adherence, "
            "FD ratio, two-sample test.",
        ),
    ] = False,
    real: Annotated[
        Path | None,
        typer.Option(help="Table models: a .csv/.parquet of held-out rows [default: the run's own test split]."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Table models: the column of the train-on-synthetic test [default: the last categorical one]."
        ),  # fmt: skip
    ] = None,
    sets: Annotated[
        int, typer.Option(min=2, max=100, help="Table models: sample sets behind each figure's mean and interval.")
    ] = 4,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a saved model. Pixel-space class models: FID/KID/precision/recall against the held-out split,
    per-class accuracy, memorization, quality vs steps. Text-to-image models (--prompts): a grid per prompt,
    the CLIP score with --clip, FID/KID against --reference. Table models: fidelity, detection, efficacy,
    privacy and imputation against held-out rows (docs/table-models.md). Every figure with its 95 % interval."""
    from sdpipe.evaluate.command import check_sweep, evaluate_saved_model, parse_list
    from sdpipe.models.pipelines import LoadedPipeline
    from sdpipe.tabular.commands import load_table_ref, table_model_path

    with _user_errors(RuntimeError):  # evaluate's errors: a wrong Inception file is a RuntimeError too
        image_only = {"--data": data, "--inception": inception, "--samplers": samplers, "--prompts": prompts,
                      "--clip": clip, "--reference": reference, "--held-out": held_out,
                      "--steps": None if steps == "5,10,20,50" else steps}  # fmt: skip
        if (table := table_model_path(model)) is not None:
            from sdpipe.tabular.evaluate_command import evaluate_command

            if image_given := _given(image_only):
                raise ValueError(
                    f"{model} is a table model: it takes --real, --target, --sets and --n, not {', '.join(image_given)}"
                )
            for line in evaluate_command(load_table_ref(table), out, real, n, sets, target):
                out_console.print(line, markup=False, highlight=False)
            return
        if real is not None or target is not None or sets != 4:
            raise ValueError("--real, --target and --sets are for table models")
        names = None if samplers is None else parse_list(samplers, "--samplers")  # checked before any loading
        counts = check_sweep(names or [], parse_list(steps, "--steps"))
        loaded = _load(model)
        if held_out:
            from sdpipe.evaluate.captioned_judge import judge_held_out, training_data, write_held_out

            unused = _given({"--n": n, **image_only, "--held-out": None})
            if unused:
                raise ValueError(f"--held-out samples every held-out caption with the run's sample settings and "
                                 f"takes none of {', '.join(unused)}")  # fmt: skip
            if not isinstance(loaded, LoadedPipeline):
                raise ValueError("--held-out is for text-to-image models")
            figures = judge_held_out(loaded, training_data(loaded.path), show_progress=not quiet)
            for line in write_held_out(out, figures):
                out_console.print(line, markup=False, highlight=False)
            return
        if isinstance(loaded, LoadedPipeline):
            _evaluate_text_to_image(loaded, out, prompts, n, clip, reference, inception, quiet)
            return
        if prompts is not None or clip is not None or reference is not None:
            raise ValueError("--prompts, --clip and --reference are for text-to-image models")
        metrics = evaluate_saved_model(
            loaded,  # a registry version's weights hash is checked
            out,
            n=n,
            data_source=data,
            inception=inception,
            samplers=names,
            steps=counts,
            show_progress=not quiet,
        )
    for warning in metrics.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}")
    d = metrics["evaluation"]["default"]
    out_console.print(
        f"FID {d['fid']:.4g}, KID {d['kid_mean']:.3g} ± {d['kid_std']:.2g}, precision {d['precision']:.3f}, "
        f"recall {d['recall']:.3f} in features {metrics['features']['name']}"
    )
    _print_summary(metrics, out)


def _evaluate_text_to_image(
    loaded: LoadedPipeline,
    out: Path,
    prompts: Path | None,
    n: int | None,
    clip: Path | None,
    reference: Path | None,
    inception: Path | None,
    quiet: bool,
) -> None:
    from sdpipe.evaluate.t2i_report import summary_lines
    from sdpipe.evaluate.text2img import evaluate_text_to_image

    if prompts is None:
        raise ValueError("a text-to-image model is evaluated on prompts: give --prompts FILE")
    metrics = evaluate_text_to_image(
        loaded,
        prompts,
        out,
        spec=_spec(loaded, None, None, None),
        images_per_prompt=n or 4,
        clip=clip,
        reference=reference,
        inception=inception,
        show_progress=not quiet,
    )
    for warning in metrics.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}")
    for line in summary_lines(metrics):
        out_console.print(line, highlight=False)
    out_console.print(f"report: {out / 'report.html'}")


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Validate a config (file + --set overrides) and print the full result as YAML."""
    import yaml

    cfg = _config(config, set_)
    out_console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False)


def _load(ref: str, device: str = "cpu", dtype: str = "float32", config: str | None = None) -> AnyModel:
    """A model from a path (any kind sdpipe loads) or a registry reference; a registry version is checked
    against what was recorded when it was registered."""
    from sdpipe.registry import load

    return load(ref, device=device, dtype=dtype, config=config)


def _registry_lora(ref: str) -> Path:
    """A registered LoRA's file, for --lora NAME@ALIAS."""
    from sdpipe.registry import lora_path

    return lora_path(ref)


def _loras(model: LoadedPipeline, options: list[str]) -> tuple[LoraRef, ...]:
    """--lora options as LoraRefs, each checked to fit the base (refused naming both; a different recorded base
    of the same architecture is a warning)."""
    from sdpipe.models.lora import base_architecture, check_fits, is_registry_ref, lora_path, parse_lora_option
    from sdpipe.registry import resolve_lora

    given = tuple(parse_lora_option(text, resolve=_registry_lora) for text in options)
    named = {lora_path(ref, _registry_lora).resolve() for ref in given}
    loras = tuple(r for r in model.default_loras if lora_path(r).resolve() not in named) + given
    for ref in loras:
        warnings = list(check_fits(model, lora_path(ref, _registry_lora)).warnings)
        path = Path(ref.ref)
        if not path.is_file() and is_registry_ref(ref.ref):  # the base its registration recorded, too
            recorded = resolve_lora(ref.ref).fits(model.hash, base_architecture(model.pipe), model.path)
            warnings += [recorded] if recorded else []
        for warning in warnings:
            err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    return loras


def _spec(
    loaded: AnyModel, steps: int | None, sampler: str | None, guidance: float | None, micro_batch: int | None = None
) -> SampleSpec:
    """The model's own sampling settings (its measured best), with the options given on the command line."""
    from dataclasses import replace

    from sdpipe.models.pipelines import LoadedPipeline
    from sdpipe.sampling.generate import model_sample_spec, pipeline_sample_spec

    if isinstance(loaded, LoadedPipeline):
        return pipeline_sample_spec(micro_batch or loaded.micro_batch, steps, sampler, guidance)
    spec = model_sample_spec(loaded.meta.config, loaded.scheduler_config, steps, sampler, guidance)
    return spec if micro_batch is None else replace(spec, micro_batch=micro_batch)


def _print_summary(metrics: dict, out: Path) -> None:
    from sdpipe.evaluate.summary import judge_table, scale_line

    out_console.print(judge_table(metrics, f"sdpipe results ({out})"), highlight=False)
    scale = scale_line(metrics)
    if scale:
        out_console.print(scale)
    if "timings_s" in metrics:
        out_console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["timings_s"].items()))
    out_console.print(
        f"report: {out / 'report.html'}" if (out / "report.html").exists() else f"metrics: {out / 'metrics.json'}"
    )


# Command groups defined in their stage's package, one line each (e.g. `app.add_typer(data_app, name="data")`).
# --- stage commands: begin ---
from sdpipe.data.cli import app as data_app  # noqa: E402

app.add_typer(data_app, name="data")
from sdpipe.models.cli import app as models_app  # noqa: E402

app.add_typer(models_app, name="models")
from sdpipe.registry.cli import app as registry_app  # noqa: E402

app.add_typer(registry_app, name="registry")
from sdpipe.train.cache_cli import app as cache_app  # noqa: E402

app.add_typer(cache_app, name="cache")
from sdpipe.serve.cli import serve as serve_command  # noqa: E402

app.command("serve")(serve_command)
# --- stage commands: end ---


def main() -> None:
    app()


if __name__ == "__main__":
    main()
