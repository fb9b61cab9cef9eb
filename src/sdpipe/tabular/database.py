"""A SQL query's rows as a table, through SQLAlchemy 2 (SQLite, PostgreSQL, MariaDB/MySQL, any dialect).

The query runs in a transaction made read-only where the database allows it (PostgreSQL and MariaDB/MySQL:
`SET TRANSACTION READ ONLY`; SQLite: `PRAGMA query_only`), and the transaction is rolled back, so a query
can never change the database. A SQLite file that does not exist is refused (SQLite would create it).
Errors give the database's own message and the URL with its password masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdpipe.tabular.sources import RawTable, TableError, _frame, mask_url


def read_query(url: str, sql: str) -> RawTable:
    """The rows of `sql` on the database at `url`, as Python values (one object column per result column)."""
    import sqlalchemy as sa

    shown = mask_url(url)
    engine = _engine(url, shown)
    try:
        with engine.connect() as conn:
            _read_only(conn)
            result = conn.execute(sa.text(sql))
            if not result.returns_rows:
                raise TableError(f"{shown}: the query returned no result set; give a SELECT (got: {_short(sql)})")
            names = list(result.keys())
            rows = result.fetchall()
            conn.rollback()
    except sa.exc.DBAPIError as exc:
        raise TableError(f"{shown}: the query failed: {_db_message(exc)} (query: {_short(sql)})") from None
    except sa.exc.SQLAlchemyError as exc:
        raise TableError(f"{shown}: the query failed: {exc} (query: {_short(sql)})") from None
    finally:
        engine.dispose()
    _check_names(names, shown)
    if not rows:
        raise TableError(f"{shown}: the query returned no rows; nothing to validate (query: {_short(sql)})")
    columns = {name: [row[j] for row in rows] for j, name in enumerate(names)}
    storage = {name: _python_types(values) for name, values in columns.items()}
    return RawTable(_frame(columns), "sql", shown, storage=storage)


def _engine(url: str, shown: str) -> Any:
    import sqlalchemy as sa

    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise TableError(f"{shown}: not a database URL (e.g. sqlite:///data.db, postgresql+psycopg://...)") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:") and not Path(db).is_file():
            raise TableError(f"{shown}: no SQLite database file {db}")
    try:
        return sa.create_engine(parsed)
    except (ImportError, sa.exc.NoSuchModuleError) as exc:
        raise TableError(f"{shown}: no driver for this database ({exc}); install it or fix the URL") from None


def _read_only(conn: Any) -> None:
    """Make the connection's transaction read-only where the dialect can."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        conn.exec_driver_sql("PRAGMA query_only = ON")
    elif dialect in ("postgresql", "mysql", "mariadb"):
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")


def _db_message(exc: Any) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return " ".join(text.split())


def _short(sql: str, n: int = 200) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= n else flat[:n] + " ..."


def _check_names(names: list[str], shown: str) -> None:
    if not names:
        raise TableError(f"{shown}: the query returned no columns")
    seen = set()
    for name in names:
        if name in seen:
            raise TableError(f"{shown}: the query returns column {name!r} twice; name them apart with AS")
        seen.add(name)


def _python_types(values: list[Any]) -> str:
    types = sorted({type(v).__name__ for v in values if v is not None})
    return "sql: " + (" / ".join(types) if types else "all NULL")
