"""Where the registry lives and its three tables (SQLAlchemy Core; SQLite by default, any SQLAlchemy URL).

    $SDPIPE_HOME/registry/registry.db          # default database (SDPIPE_HOME defaults to ~/.sdpipe)
    $SDPIPE_HOME/registry/store/NAME/VERSION/  # read-only copies of the registered model directories

`SDPIPE_REGISTRY_URL` (or `--registry-url`) picks another database, e.g. `postgresql+psycopg://...`; the
store then defaults to `store/` beside a SQLite file, else to `$SDPIPE_HOME/registry/store`, and
`SDPIPE_REGISTRY_STORE` (or `--store`) overrides it (point every machine at the same shared folder).

`versions` holds one row per immutable version, `aliases` the current target of each alias, and `events`
the append-only log of every register / alias / rollback (UPDATE and DELETE on it are refused by a
trigger on SQLite and PostgreSQL).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

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

_SQLITE_APPEND_ONLY = [
    f"CREATE TRIGGER IF NOT EXISTS events_no_{op.lower()} BEFORE {op} ON events "
    "BEGIN SELECT RAISE(ABORT, 'the events log is append-only'); END"
    for op in ("UPDATE", "DELETE")
]
_POSTGRES_APPEND_ONLY = [
    "CREATE OR REPLACE FUNCTION sdpipe_events_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'the events log is append-only'; END $$",
    "CREATE OR REPLACE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events "
    "FOR EACH STATEMENT EXECUTE FUNCTION sdpipe_events_append_only()",
]


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
    """Connect (creating a SQLite file's folder) and create the tables if they are not there yet."""
    db_file = sqlite_file(url)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    # writers wait for each other's (short) transactions instead of failing at once
    connect_args = {"timeout": 30} if make_url(url).get_backend_name() == "sqlite" else {}
    engine = sa.create_engine(url, connect_args=connect_args)
    if set(metadata.tables) <= set(sa.inspect(engine).get_table_names()):
        return engine
    for attempt in range(10):
        try:
            _create_schema(engine)
            return engine
        except sa.exc.DBAPIError:  # another process is creating the same tables at this very moment
            if attempt == 9:
                raise
            time.sleep(0.05 * (attempt + 1))
    return engine


def _create_schema(engine: sa.Engine) -> None:
    """Tables (checked first) and the append-only triggers (idempotent): safe to run again."""
    metadata.create_all(engine)
    statements = {"sqlite": _SQLITE_APPEND_ONLY, "postgresql": _POSTGRES_APPEND_ONLY}
    with engine.begin() as conn:
        for statement in statements.get(engine.dialect.name, []):
            conn.exec_driver_sql(statement)
