"""`sdpipe data ...` commands (a typer app added to the main CLI): `validate`, `emoji`.

`validate` takes image sources and tables: a .csv/.tsv file, a .parquet file without an image column (or a
folder of either), `--db URL --sql QUERY`, or `--kind table` go to the table validator (sdpipe.tabular);
everything else to the image validator (sdpipe.data.validate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

app = typer.Typer(help="Check data before training: sources, bad files, duplicates, splits.", no_args_is_help=True)
out_console = Console()
err_console = Console(stderr=True)


@app.command()
def validate(
    out: Annotated[Path, typer.Option(help="Folder for manifest.parquet, report.json, report.html.")],
    source: Annotated[
        str | None,
        typer.Argument(
            help="Image folder, saved HF dataset, .parquet, .tar shards, .npz/.npy, or 'digits'; or a table: "
            ".csv/.tsv, .parquet without an image column, or a folder of them."
        ),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(help="folder, hf, parquet, webdataset, arrays, digits or table (default: detected)."),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (its data section).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting, e.g. --set data.min_size=16.")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            help="Exit with status 1 if anything was quarantined (tables: any leak, duplicate or personal data)."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress counter.")] = False,
    db: Annotated[str | None, typer.Option("--db", help="Tables: a database URL (SQLAlchemy), with --sql.")] = None,
    sql: Annotated[str | None, typer.Option("--sql", help="Tables: the query whose rows are the table.")] = None,
    heldout: Annotated[
        Path | None, typer.Option(help="Tables: a separate held-out table; its rows found in TABLE are leaks.")
    ] = None,
) -> None:
    """Read every file of SOURCE once and write OUT/manifest.parquet, OUT/report.json and OUT/report.html."""
    if db is not None or sql is not None or kind == "table" or (kind is None and source and _is_table(source)):
        _validate_table(source, out, config, set_, strict, quiet, db, sql, heldout)
        return
    from sdpipe.config import ConfigError, load_config
    from sdpipe.data.report import print_summary
    from sdpipe.data.sources import KINDS, SourceError
    from sdpipe.data.validate import validate as run_validate

    if source is None:
        _fail("give a SOURCE to validate (or, for a table in a database, --db URL --sql QUERY)")
    if heldout is not None:
        _fail("--heldout is for tables (.csv, .parquet without images, --db/--sql)")
    if kind is not None and kind not in KINDS:
        _fail(f"--kind {kind!r}: one of {', '.join(KINDS)}, table")
    try:
        cfg = load_config(config, set_).data
        report = run_validate(source, out, cfg, kind=kind, show_progress=not quiet)
    except (ConfigError, SourceError) as exc:
        _fail(str(exc))
    print_summary(report, out_console, out)
    if strict and report["quarantined"]:
        err_console.print(f"[bold red]--strict:[/] {len(report['quarantined'])} files quarantined", highlight=False)
        raise typer.Exit(1)


def _fail(message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _is_table(source: str) -> bool:
    from sdpipe.tabular.sources import is_table_source

    return is_table_source(source)


def _validate_table(
    source: str | None,
    out: Path,
    config: Path | None,
    set_: list[str] | None,
    strict: bool,
    quiet: bool,
    db: str | None,
    sql: str | None,
    heldout: Path | None,
) -> None:
    from sdpipe.config import ConfigError
    from sdpipe.data.sources import SourceError
    from sdpipe.tabular.config import TableConfigError, load_table_config
    from sdpipe.tabular.report import print_summary
    from sdpipe.tabular.validate import validate_table

    if (db is None) != (sql is None):
        _fail("--db and --sql go together: the database URL and the query whose rows are the table")
    if source is not None and db is not None:
        _fail(f"give a table ({source}) or --db/--sql, not both")
    try:
        values = _table_settings(config, set_)
        if source is not None:
            values.update(path=source, db_url=None, sql=None)
        if db is not None:
            values.update(path=None, db_url=db, sql=sql)
        if heldout is not None:
            values["heldout_path"] = str(heldout)
        report = validate_table(load_table_config(values), out, show_progress=not quiet)
    except (ConfigError, TableConfigError, SourceError) as exc:
        _fail(str(exc))
    print_summary(report, out_console, out)
    problems = {
        "leaks": report["leak_count"] + (report["heldout"] or {}).get("leak_count", 0),
        "duplicate rows": report["duplicate_rows"],
        "columns with personal data": len({p["column"] for p in report["personal_data"]}),
    }
    if strict and any(problems.values()):
        shown = ", ".join(f"{v} {k}" for k, v in problems.items() if v)
        err_console.print(f"[bold red]--strict:[/] {shown}", highlight=False)
        raise typer.Exit(1)


def _table_settings(config: Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """The `data:` section of a YAML config with `--set data.key=value` overrides applied (tables take only
    data settings); typed and checked by `load_table_config`."""

    from sdpipe.config import ConfigError, parse_override, read_config_file

    values: dict[str, Any] = {}
    if config is not None:
        section = read_config_file(config).get("data", {})
        if not isinstance(section, dict):
            raise ConfigError(f"{config}: the data section must be a mapping of settings")
        values = dict(section)
    for item in overrides or []:
        key, value = parse_override(item)
        parts = key.split(".")
        if parts[0] != "data" or len(parts) < 2:
            raise ConfigError(f"--set {item!r}: a table's validation takes data.* settings only")
        node = values
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is a value, not a section")
        node[parts[-1]] = value
    return values


@app.command()
def emoji(
    package: Annotated[
        Path, typer.Argument(help="An unpacked emoji-datasource npm package (the folder with emoji.json and img/).")
    ],
    out: Annotated[Path, typer.Option(help="New folder for the captioned images (category subfolders).")],
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
) -> None:
    """Make a captioned image folder from an emoji-datasource package (`npm pack emoji-datasource-twitter`):
    each emoji composited on white, captioned with its name and sub-category, filed under its category."""
    from sdpipe.data.emoji import write_emoji_folder

    try:
        counts = write_emoji_folder(package, out, size=size)
    except ValueError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    out_console.print(f"{sum(counts.values())} images in {len(counts)} categories -> {out}", markup=False)
