"""`sdpipe data ...` commands (a typer app added to the main CLI): `validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Check data before training: sources, bad files, duplicates, splits.", no_args_is_help=True)
out_console = Console()
err_console = Console(stderr=True)


@app.command()
def validate(
    source: Annotated[
        str, typer.Argument(help="Image folder, saved HF dataset, .parquet, .tar shards, .npz/.npy, or 'digits'.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for manifest.parquet, report.json, report.html.")],
    kind: Annotated[
        str | None, typer.Option(help="folder, hf, parquet, webdataset, arrays or digits (default: detected).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (its data section).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting, e.g. --set data.min_size=16.")
    ] = None,
    strict: Annotated[bool, typer.Option(help="Exit with status 1 if anything was quarantined.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress counter.")] = False,
) -> None:
    """Read every file of SOURCE once and write OUT/manifest.parquet, OUT/report.json and OUT/report.html."""
    from sdpipe.config import ConfigError, load_config
    from sdpipe.data.report import print_summary
    from sdpipe.data.sources import KINDS, SourceError
    from sdpipe.data.validate import validate as run_validate

    if kind is not None and kind not in KINDS:
        err_console.print(f"[bold red]error:[/] --kind {kind!r}: one of {', '.join(KINDS)}", highlight=False)
        raise typer.Exit(2)
    try:
        cfg = load_config(config, set_).data
        report = run_validate(source, out, cfg, kind=kind, show_progress=not quiet)
    except (ConfigError, SourceError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    print_summary(report, out_console, out)
    if strict and report["quarantined"]:
        err_console.print(f"[bold red]--strict:[/] {len(report['quarantined'])} files quarantined", highlight=False)
        raise typer.Exit(1)
