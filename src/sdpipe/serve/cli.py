"""`sdpipe serve`: the HTTP server on uvicorn (registered in `sdpipe.cli`; heavy imports happen on call).

Everything a user can get wrong stops the command with one line on stderr and exit code 2, before the
server listens: settings, the API key file, the address (a port out of 1..65535 or already in use), and
the model (a wrong reference, a path that is not a model sdpipe loads, a registry version whose weights
changed, a device or dtype it cannot run on).
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    import uvicorn

err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def load_api_keys(path: Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are ignored."""
    if not path.is_file():
        raise ValueError(f"API key file not found: {path}")
    keys = [line.strip() for line in path.read_text().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no API key: write one key per line")
    return keys


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn to serve on; ValueError, in one line, if it cannot be had."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port} is not a port: use one from 1 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn decides
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


def serve(
    model: Annotated[
        str,
        typer.Option(
            help="sdpipe model folder, Stable Diffusion diffusers folder or .safetensors checkpoint, or registry "
            "reference NAME@ALIAS / NAME:VERSION."
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (1 to 65535).")] = 8000,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File of API keys, one a line: requests then need Authorization: Bearer KEY.")
    ] = None,
    registry_url: Annotated[str | None, typer.Option(help="Model registry URL (default: the registry's own).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Server setting, e.g. --set max_batch=32 (see docs/serving.md; repeatable)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level: warning, info, debug.")] = "info",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or mps.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 (Stable Diffusion models).")] = "float32",
    single_file_config: Annotated[
        str | None,
        typer.Option(
            "--config", help="A single-file checkpoint's config: sd15, sd2-v, sd2-base, sdxl-base, ... or a folder."
        ),
    ] = None,
) -> None:
    """Serve a model over HTTP: POST /v1/generate, the web UI's API under /sdapi/v1 (Stable Diffusion models),
    a web page at /, /healthz, /readyz, /metrics. A table model serves POST /v1/generate (rows as JSON or
    CSV) and POST /v1/impute instead (sdpipe.serve.tables)."""
    import logging

    import uvicorn

    from sdpipe.config import ConfigError
    from sdpipe.serve.app import create_app
    from sdpipe.serve.holder import model_resolver
    from sdpipe.serve.settings import load_settings

    if log_level.lower() not in LOG_LEVELS:
        raise _fail(f"unknown --log-level {log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    try:
        settings = load_settings(set_)
        keys = load_api_keys(api_key_file) if api_key_file is not None else None
        sock = listen(host, port)
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sdpipe.serve.tables import table_app_for

    app = table_app_for(model, registry_url, device, dtype, settings, keys) or create_app(
        model_resolver(model, registry_url, device, dtype, single_file_config), settings, keys
    )
    try:
        app.state.holder.refresh()  # load, check and warm up the model now: a wrong or damaged one stops here
    except Exception as exc:  # the registry's own errors included
        sock.close()
        raise _fail(f"cannot serve model {model!r}: {exc}") from None
    _run(uvicorn.Config(app, host=host, port=port, log_level=log_level.lower()), sock)


def _run(config: uvicorn.Config, sock: socket.socket) -> None:
    """Serve on `sock` until Ctrl-C or SIGTERM, as `uvicorn.run` does (`config`'s host and port: for its log)."""
    import uvicorn

    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    if not server.started:
        raise typer.Exit(3)  # uvicorn's exit code when the app failed to start (it said why)
