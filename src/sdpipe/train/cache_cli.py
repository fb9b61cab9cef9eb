"""`sdpipe cache ...`: what the training caches (VAE latents, text embeddings) hold, and removing them.

Commands: `sdpipe cache info [--root DIR]` and `sdpipe cache clear [--root DIR] [--kind latents|text] [--yes]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sdpipe.models.cli import human_size
from sdpipe.train import cache

app = typer.Typer(
    help="Training caches (VAE latents, text embeddings): what they hold, and removing them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

RootOption = Annotated[Path | None, typer.Option("--root", help="The cache folder (default: $SDPIPE_CACHE_DIR/train).")]


@app.callback()
def _cache() -> None:
    """Training caches (VAE latents, text embeddings): what they hold, and removing them."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


@app.command()
def info(root: RootOption = None) -> None:
    """A table of what is cached: per kind, entries, shards, size and the encoder hashes they were made with."""
    where = root if root is not None else cache.default_root()
    try:
        found = cache.info(where)
    except OSError as exc:
        raise _fail(f"{where}: {exc}") from None
    table = Table(title=f"training caches in {escape(str(where))}")
    for column in ("kind", "entries", "shards", "size", "encoder hashes"):
        table.add_column(column, justify="right" if column in ("entries", "shards", "size") else "left")
    for kind, row in found.items():
        encoders = ", ".join(row["encoders"]) or "-"
        table.add_row(kind, f"{row['entries']:,}", f"{row['shards']:,}", human_size(row["bytes"]), escape(encoders))
    out_console.print(table)


@app.command()
def clear(
    root: RootOption = None,
    kind: Annotated[str | None, typer.Option("--kind", help="Only this cache: latents or text.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove cached latents and/or text embeddings (they are rebuilt when a run needs them)."""
    if kind is not None and kind not in cache.KINDS:
        raise _fail(f"--kind {kind!r} is not a cache kind; use one of: {', '.join(cache.KINDS)}")
    where = root if root is not None else cache.default_root()
    what = kind or " and ".join(cache.KINDS)
    if not yes and not typer.confirm(f"remove the {what} cache in {where}?", default=False):
        raise _fail("nothing removed (pass --yes to skip this question)", code=1)
    try:
        removed = cache.clear(where, kind)
    except OSError as exc:
        raise _fail(f"{where}: {exc}") from None
    for name, row in removed.items():
        out_console.print(
            f"{name}: removed {row['shards']} shards ({row['files']} files, {human_size(row['bytes'])})",
            markup=False,
            highlight=False,
        )
