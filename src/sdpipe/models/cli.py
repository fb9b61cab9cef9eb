"""`sdpipe models ...`: look at a model file or folder without loading it.

    sdpipe models inspect PATH [--json] [--no-hash]

A path that is not a usable model (a pickle, a truncated file, a LoRA or a VAE alone, unknown keys) gets one
`error: ...` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from sdpipe.models.files import Identity, ModelFileError, identify

app = typer.Typer(
    help="Model files and folders: what they are (kind, architecture, components, hashes).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console(soft_wrap=True)  # long paths and hashes stay on one line
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line


@app.callback()
def _models() -> None:
    """Model files and folders: what they are (kind, architecture, components, hashes)."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A diffusers pipeline folder, an sdpipe model, a .safetensors file.")],
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip hashing (seconds for a large file, once).")] = False,
) -> None:
    """Print what PATH is: kind, architecture, prediction type, components (class, dtype, parameters), size,
    sha256 and short hash. Only JSON and safetensors headers are read; nothing is loaded or unpickled."""
    try:
        found = identify(path, allow_lora=True, with_hash=not no_hash)
    except (ModelFileError, OSError) as exc:
        raise _fail(str(exc)) from None
    if json_:
        typer.echo(json.dumps(found.to_dict(), indent=2))
    else:
        for line in describe(found):
            out_console.print(line, markup=False, highlight=False)


def describe(found: Identity) -> list[str]:
    """The lines `inspect` prints for an Identity."""
    lines = [
        f"path             {found.path}",
        f"kind             {found.kind}",
        f"architecture     {found.architecture}",
        f"prediction type  {found.prediction_type or '-'}",
        f"size             {human_size(found.size_bytes)} ({found.size_bytes:,} bytes)",
        f"sha256           {found.sha256 or '-'}",
        f"short hash       {found.short_hash or '-'}",
        "components",
    ]
    width = max(len(c.name) for c in found.components) if found.components else 0
    for c in found.components:
        weights = f"{c.dtype}, {c.parameters:,} parameters" if c.parameters else "no weights"
        lines.append(f"  {c.name:<{width}}  {c.class_name or '-'}  ({weights})")
    lines += [f"note: {note}" for note in found.notes]
    return lines


def human_size(n: int) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 2.0 GiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    size, i = float(n), 0
    while size >= 1024 and i < len(units) - 1:
        size, i = size / 1024, i + 1
    return f"{n} B" if i == 0 else f"{size:.1f} {units[i]}"
