"""`sdpipe registry ...`: register model versions, move aliases, roll back, and read the log.

A version is an sdpipe model folder, a diffusers Stable Diffusion folder, a web-UI single-file checkpoint or a
LoRA file (`register --base REF` records the model a LoRA was made for).

Every command takes `--registry-url` (env `SDPIPE_REGISTRY_URL`; default a SQLite file under
`$SDPIPE_HOME/registry`) and `--store` (env `SDPIPE_REGISTRY_STORE`), and `--json` for scripts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sdpipe.registry.names import RegistryError

if TYPE_CHECKING:
    from sdpipe.registry.core import Registry
    from sdpipe.registry.records import AliasMove, Version

app = typer.Typer(
    help="Model registry: immutable numbered versions with lineage, aliases (e.g. production), rollback, a log.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console(soft_wrap=True)  # long paths and hashes stay on one line
err_console = Console(stderr=True, soft_wrap=True)

UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--registry-url",
        envvar="SDPIPE_REGISTRY_URL",
        help="SQLAlchemy URL of the registry database, e.g. postgresql+psycopg://host/db "
        "(default: sqlite file $SDPIPE_HOME/registry/registry.db, SDPIPE_HOME defaulting to ~/.sdpipe).",
        show_default=False,
    ),
]
StoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store",
        envvar="SDPIPE_REGISTRY_STORE",
        help="Folder holding the stored model files (default: store/ beside a SQLite database, "
        "else $SDPIPE_HOME/registry/store).",
        show_default=False,
    ),
]
T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
NameArg = Annotated[str, typer.Argument(help="Model name: lowercase letters, digits, '.', '_', '-'.")]
AliasArg = Annotated[str, typer.Argument(help="Alias, e.g. production or staging.")]
RefArg = Annotated[str, typer.Argument(help="NAME (latest version), NAME@ALIAS or NAME:VERSION.")]


def _open(url: str | None, store: Path | None) -> Registry:
    from sdpipe.registry.core import Registry

    try:
        return Registry(url, store)
    except RegistryError as exc:
        raise _fail(str(exc)) from None


def _on(url: str | None, store: Path | None, action: Callable[[Registry], T], code: int = 2) -> T:
    """`action` on the registry at `url`; a RegistryError becomes one red line and exit `code`."""
    reg = _open(url, store)
    try:
        return action(reg)
    except RegistryError as exc:
        raise _fail(str(exc), code) from None


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


@app.command()
def register(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="Model directory (as written by sdpipe train or demo), diffusers Stable Diffusion folder, "
            "single-file .safetensors checkpoint, or LoRA .safetensors file.",
            metavar="MODEL",
        ),
    ],
    name: Annotated[str, typer.Option(help="Model name: lowercase letters, digits, '.', '_', '-'.")],
    metrics: Annotated[
        Path | None,
        typer.Option(help="Metrics JSON to record (default for sdpipe models: metrics.json beside MODEL, if there)."),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            help="A LoRA's base model, a registry reference or a path: its hash is recorded (default: the hash "
            "the LoRA's metadata records, else unknown).",
            show_default=False,
        ),
    ] = None,
    registry_url: UrlOpt = None,
    store: StoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Copy MODEL into the registry as the next version of NAME (same weights: the existing version)."""
    from sdpipe.registry.loras import describe_base

    version = _on(registry_url, store, lambda reg: reg.register(model_dir, name, metrics=metrics, base=base))
    if json_:
        return _json(version.to_dict())
    state = "registered" if version.created else "already registered (same weights) as"
    if version.kind == "pixel-class":
        out_console.print(f"{state} {version.ref}  {version.weights_hash}  {version.path}", highlight=False)
        return
    what = f"{version.kind} {version.architecture}  {version.weights_hash[:23]}"
    out_console.print(f"{state} {version.ref}  {what}  {version.model_path}", highlight=False)
    if version.kind == "lora":
        out_console.print(f"  made for the base {describe_base(version.base)}", highlight=False)
        if not (version.base or {}).get("hash"):
            out_console.print(
                "  note: with its base unknown, only its architecture can be checked against a base model "
                "(register --base REF records one)",
                highlight=False,
            )


@app.command()
def alias(
    name: NameArg,
    alias: AliasArg,
    version: Annotated[int, typer.Argument(help="Version number the alias should point at.")],
    registry_url: UrlOpt = None,
    store: StoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Point NAME@ALIAS at VERSION (creating the alias if needed); the move is logged."""
    move = _on(registry_url, store, lambda reg: reg.alias(name, alias, version))
    _print_move(move, json_)


@app.command()
def rollback(
    name: NameArg,
    alias: AliasArg,
    registry_url: UrlOpt = None,
    store: StoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Move NAME@ALIAS back to the version it pointed to before (again to go further back)."""
    move = _on(registry_url, store, lambda reg: reg.rollback(name, alias))
    _print_move(move, json_)


@app.command("list")
def list_models(registry_url: UrlOpt = None, store: StoreOpt = None, json_: JsonOpt = False) -> None:
    """List the registered models with their versions and aliases."""
    models = _open(registry_url, store).list()
    if json_:
        return _json([m.to_dict() for m in models])
    if not models:
        out_console.print("no models registered yet (sdpipe registry register MODEL --name NAME)")
        return
    table = Table()
    for col in ("name", "kind", "architecture", "versions", "latest", "aliases"):
        table.add_column(col)
    for m in models:
        moved = ", ".join(f"{a}→{v}" for a, v in m.aliases.items())
        table.add_row(m.name, m.kind, m.architecture, str(m.versions), str(m.latest), moved)
    out_console.print(table)


@app.command()
def show(ref: RefArg, registry_url: UrlOpt = None, store: StoreOpt = None, json_: JsonOpt = False) -> None:
    """Show one version: where it is stored, its hashes, aliases and lineage."""
    from sdpipe.registry.names import parse_ref

    version = _on(registry_url, store, lambda reg: reg.show(parse_ref(ref)))
    if json_:
        return _json(version.to_dict())
    _print_version(version)


@app.command()
def history(
    name: Annotated[str | None, typer.Argument(help="Model name (default: every model).")] = None,
    registry_url: UrlOpt = None,
    store: StoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """The append-only log of every register, alias and rollback, with time and user, oldest first."""
    found = _on(registry_url, store, lambda reg: reg.history(name))
    if json_:
        return _json([e.to_dict() for e in found])
    table = Table()
    for col in ("time", "user", "action", "model", "version", "before"):
        table.add_column(col)
    for e in found:
        model = e.name if e.alias is None else f"{e.name}@{e.alias}"
        action = e.action + (" (existing)" if e.detail.get("existing") else "")
        before = "" if e.previous is None else str(e.previous)
        table.add_row(e.time[:19].replace("T", " "), e.user, action, model, str(e.version), before)
    out_console.print(table)


@app.command()
def verify(ref: RefArg, registry_url: UrlOpt = None, store: StoreOpt = None) -> None:
    """Check that a stored version is unchanged: its files' content hash and its weights hash (sha256)."""
    from sdpipe.registry.names import parse_ref

    def verify_and_load(reg: Registry) -> Version:
        version = reg.verify(parse_ref(ref))  # a Stable Diffusion model's or LoRA's sha256 too
        if version.kind == "pixel-class":
            reg.load(version.ref)  # its weights hash is of the loaded weights
        return version

    version = _on(registry_url, store, verify_and_load, code=1)
    label = "weights" if version.kind == "pixel-class" else version.kind
    out_console.print(f"{version.ref} is intact: {version.content_hash}, {label} {version.weights_hash}")


def _print_move(move: AliasMove, as_json: bool) -> None:
    if as_json:
        return _json(move.to_dict())
    if not move.changed:
        out_console.print(f"{move.name}@{move.alias} already points at version {move.version}")
        return
    before = "" if move.previous is None else f" (was {move.previous})"
    out_console.print(f"{move.name}@{move.alias} -> version {move.version}{before}", highlight=False)


def _print_version(v: Version) -> None:
    from sdpipe.registry.loras import describe_base

    lineage = v.lineage
    metrics = lineage.get("metrics")
    keys = ", ".join(metrics) if isinstance(metrics, dict) else type(metrics).__name__
    rows = {
        "version": v.ref,
        "kind": f"{v.kind} ({v.architecture})",
        "aliases": ", ".join(v.aliases) or "-",
        "path": str(v.model_path),
    }
    if v.kind == "pixel-class":
        rows["weights hash"] = v.weights_hash
    else:
        identity = v.identity or {}
        rows["sha256"] = v.weights_hash
        rows["web-UI hash"] = v.short_hash
        if identity.get("prediction_type"):
            rows["prediction"] = identity["prediction_type"]
        rows["components"] = ", ".join(_component(c) for c in identity.get("components", [])) or "-"
    if v.kind == "lora":
        rows["base"] = describe_base(v.base)
    rows["content hash"] = v.content_hash
    if v.kind != "pixel-class":  # a pixel-space model is small, and named by its weights hash (size: --json)
        rows["size"] = "-" if v.size_bytes is None else f"{v.size_bytes:,} bytes"
    rows |= {
        "dataset": v.dataset_id or "-",
        "registered": f"{v.created_at} by {v.user}",
        "source": lineage.get("source") or "-",
        "git commit": lineage.get("git_commit") or "-",
        "libraries": ", ".join(f"{k} {val}" for k, val in (lineage.get("versions") or {}).items()) or "-",
        "metrics": "-" if metrics is None else f"{lineage.get('metrics_file')} ({keys})",
    }
    for note in (v.identity or {}).get("notes", []):
        rows.setdefault("notes", note)
        if rows["notes"] != note:
            rows["notes"] += f"; {note}"
    for key, value in rows.items():
        out_console.print(f"[bold]{key:>13}[/]  {escape(str(value))}", highlight=False)


def _component(c: dict[str, Any]) -> str:
    """'unet (float16, 859,520,964 parameters)', or just the name for one without weights."""
    if not c.get("parameters"):
        return str(c["name"])
    return f"{c['name']} ({c['dtype']}, {c['parameters']:,} parameters)"
