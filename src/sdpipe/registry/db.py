"""Where the registry lives and its three tables (SQLAlchemy Core; SQLite by default, any SQLAlchemy URL).

    $SDPIPE_HOME/registry/registry.db          # default database (SDPIPE_HOME defaults to ~/.sdpipe)
    $SDPIPE_HOME/registry/store/NAME/VERSION/  # read-only copies of the registered model directories

`SDPIPE_REGISTRY_URL` (or `--registry-url`) picks another database, e.g. `postgresql+psycopg://...`; the
store then defaults to `store/` beside a SQLite file, else to `$SDPIPE_HOME/registry/store`, and
`SDPIPE_REGISTRY_STORE` (or `--store`) overrides it (point every machine at the same shared folder).

`versions` holds one row per immutable version, `aliases` the current target of each alias, and `events`
the append-only log of every register / alias / rollback. UPDATE and DELETE on `versions` and `events` are
refused by triggers on SQLite, PostgreSQL and MySQL/MariaDB, created on every open where they are missing.

A database made by an older sdpipe is brought up to date on open: the triggers it lacks are created, and the
columns `versions` gained since (`ADDED_COLUMNS`: what kind of model a version is, for Stable Diffusion models
and LoRAs) are added with `ALTER TABLE ... ADD COLUMN`, their defaults describing the pixel-space models that
were all an older registry could hold. Both are idempotent, and safe when several processes open it at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.schema import CreateColumn

metadata = sa.MetaData()

versions = sa.Table(
    "versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("weights_hash", sa.String(80), nullable=False),
    sa.Column("content_hash", sa.String(80), nullable=False),  # every file of the stored directory
    sa.Column("dataset_id", sa.String(200), nullable=False),
    sa.Column("lineage", sa.JSON, nullable=False),  # config, metrics, versions, git_commit, source
    sa.Column("created_at", sa.String(40), nullable=False),  # ISO 8601, UTC
    sa.Column("user", sa.String(200), nullable=False),
    # added after the first release (see ADDED_COLUMNS): older rows are pixel-space models
    sa.Column("kind", sa.String(20), nullable=False, server_default="pixel-class"),  # as models.files.identify
    sa.Column("architecture", sa.String(40), nullable=False, server_default="unet2d"),  # sd1, sdxl, ...
    sa.Column("size_bytes", sa.BigInteger, nullable=True),  # the model's files (None: registered before)
    sa.Column("stored_file", sa.String(255), nullable=True),  # a single file's name in its folder; None: the folder
    sa.Column("base", sa.JSON, nullable=True),  # a LoRA's base model: hash, its kind, architecture, where from
    sa.Column("identity", sa.JSON, nullable=True),  # identify's short hash, prediction type, components, notes
    sa.UniqueConstraint("name", "version", name="uq_versions_name_version"),
    sa.UniqueConstraint("name", "weights_hash", name="uq_versions_name_weights"),
)

aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
    sa.UniqueConstraint("name", "alias", name="uq_aliases_name_alias"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.String(40), nullable=False),
    sa.Column("user", sa.String(200), nullable=False),
    sa.Column("action", sa.String(20), nullable=False),  # register | alias | rollback
    sa.Column("name", sa.String(64), nullable=False, index=True),
    sa.Column("alias", sa.String(64), nullable=True),
    sa.Column("version", sa.Integer, nullable=False),  # registered version, or the alias's new target
    sa.Column("previous", sa.Integer, nullable=True),  # the alias's target before
    sa.Column("detail", sa.JSON, nullable=False),
)

# the columns of `versions` that databases made by an older sdpipe lack, added on open (in this order)
ADDED_COLUMNS = ("kind", "architecture", "size_bytes", "stored_file", "base", "identity")

# the tables whose rows are never changed or removed, and the message a trigger refuses UPDATE or DELETE with
APPEND_ONLY = {
    "events": "the events log is append-only",
    "versions": "registered versions are append-only: register a new version instead",
}
_POSTGRES_REFUSE = (
    "CREATE OR REPLACE FUNCTION sdpipe_refuse_change() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION USING MESSAGE = TG_ARGV[0]; END $$"
)
_TRIGGER_NAMES = {  # the query listing the triggers already there
    "sqlite": "SELECT name FROM sqlite_master WHERE type = 'trigger'",
    "postgresql": "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal "
    "AND tgrelid IN ('events'::regclass, 'versions'::regclass)",
    "mysql": "SELECT trigger_name FROM information_schema.triggers WHERE trigger_schema = DATABASE()",
}
_TRIGGER_NAMES["mariadb"] = _TRIGGER_NAMES["mysql"]


def home() -> Path:
    return Path(os.environ.get("SDPIPE_HOME") or Path.home() / ".sdpipe").expanduser()


def default_url() -> str:
    """`SDPIPE_REGISTRY_URL`, else a SQLite file under `$SDPIPE_HOME/registry`."""
    return os.environ.get("SDPIPE_REGISTRY_URL") or f"sqlite:///{home() / 'registry' / 'registry.db'}"


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def default_store(url: str) -> Path:
    """`SDPIPE_REGISTRY_STORE`, else `store/` beside a SQLite file, else `$SDPIPE_HOME/registry/store`."""
    if os.environ.get("SDPIPE_REGISTRY_STORE"):
        return Path(os.environ["SDPIPE_REGISTRY_STORE"]).expanduser()
    db_file = sqlite_file(url)
    return db_file.parent / "store" if db_file is not None else home() / "registry" / "store"


def open_engine(url: str) -> sa.Engine:
    """Connect (creating a SQLite file's folder), then create the tables, columns and append-only triggers
    that are not there yet: a database made by an older sdpipe gets the columns and triggers it lacks."""
    db_file = sqlite_file(url)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    # writers wait for each other's (short) transactions instead of failing at once
    connect_args = {"timeout": 30} if make_url(url).get_backend_name() == "sqlite" else {}
    engine = sa.create_engine(url, connect_args=connect_args)
    with engine.connect():  # a database that does not answer fails here, at once
        pass
    for attempt in range(10):
        try:
            metadata.create_all(engine)  # only the tables that are missing
            add_missing_columns(engine)
            install_triggers(engine)
            return engine
        except sa.exc.DBAPIError:  # another process is creating the same tables or triggers at this very moment
            if attempt == 9:
                raise
            time.sleep(0.05 * (attempt + 1))
    return engine


def add_missing_columns(engine: sa.Engine) -> None:
    """`ALTER TABLE versions ADD COLUMN` for each of `ADDED_COLUMNS` the table lacks (idempotent). The column
    definitions are compiled from `versions` for the database at hand; the NOT NULL ones carry a default, so
    the rows already there get it (no UPDATE runs, so the append-only triggers are not involved). Two
    processes adding the same column at once: the loser's error makes `open_engine` look again."""
    with engine.connect() as conn:
        present = {c["name"] for c in sa.inspect(conn).get_columns("versions")}
    missing = [name for name in ADDED_COLUMNS if name not in present]
    if not missing:
        return
    with engine.begin() as conn:
        for name in missing:
            definition = CreateColumn(versions.c[name]).compile(dialect=engine.dialect)
            conn.exec_driver_sql(f"ALTER TABLE versions ADD COLUMN {definition}")


def install_triggers(engine: sa.Engine) -> None:
    """Create the triggers refusing UPDATE and DELETE on the `APPEND_ONLY` tables that are missing (idempotent)."""
    dialect = engine.dialect.name
    wanted = _append_only_triggers(dialect)
    if not wanted:
        return
    with engine.begin() as conn:
        present = set(conn.exec_driver_sql(_TRIGGER_NAMES[dialect]).scalars())
        missing = [statement for name, statement in wanted.items() if name not in present]
        if missing and dialect == "postgresql":
            missing.insert(0, _POSTGRES_REFUSE)
        for statement in missing:
            conn.exec_driver_sql(statement)


def _append_only_triggers(dialect: str) -> dict[str, str]:
    """Trigger name -> the statement creating it, for `dialect` (none for databases not listed here)."""
    found: dict[str, str] = {}
    for table, message in APPEND_ONLY.items():
        if dialect == "postgresql":
            found[f"{table}_append_only"] = (
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION sdpipe_refuse_change('{message}')"
            )
            continue
        for op in ("UPDATE", "DELETE"):
            name = f"{table}_no_{op.lower()}"
            if dialect == "sqlite":
                refuse = f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
                found[name] = f"CREATE TRIGGER {name} BEFORE {op} ON {table} {refuse}"
            elif dialect in ("mysql", "mariadb"):
                found[name] = (
                    f"CREATE TRIGGER {name} BEFORE {op} ON {table} FOR EACH ROW "
                    f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{message}'"
                )
    return found
