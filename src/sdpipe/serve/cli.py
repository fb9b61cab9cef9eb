"""`sdpipe serve`: the HTTP server on uvicorn (registered in `sdpipe.cli`; heavy imports happen on call)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err_console = Console(stderr=True)


def load_api_keys(path: Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are ignored."""
    if not path.is_file():
        raise ValueError(f"API key file not found: {path}")
    keys = [line.strip() for line in path.read_text().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no API key: write one key per line")
    return keys


def serve(
    model: Annotated[str, typer.Option(help="Model directory, or registry reference NAME@ALIAS / NAME:VERSION.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File of API keys, one a line: requests then need Authorization: Bearer KEY.")
    ] = None,
    registry_url: Annotated[str | None, typer.Option(help="Model registry URL (default: the registry's own).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Server setting, e.g. --set max_batch=32 (see docs/serving.md; repeatable)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level: warning, info, debug.")] = "info",
) -> None:
    """Serve a model over HTTP: POST /v1/generate, a web page at /, /healthz, /readyz, /metrics."""
    import logging

    import uvicorn

    from sdpipe.config import ConfigError
    from sdpipe.serve.app import create_app
    from sdpipe.serve.holder import identify, model_resolver
    from sdpipe.serve.settings import load_settings

    try:
        settings = load_settings(set_)
        keys = load_api_keys(api_key_file) if api_key_file is not None else None
        resolver = model_resolver(model, registry_url)
    except (ConfigError, ValueError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    try:
        identify(resolver())  # a wrong reference stops here, before the server starts
    except Exception as exc:  # the registry's own errors included
        err_console.print(f"[bold red]error:[/] cannot resolve model {model!r}: {exc}", highlight=False)
        raise typer.Exit(2) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(resolver, settings, keys)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
