"""Table sources: CSV, Parquet (files and folders) and SQL queries (SQLite here; PostgreSQL and MariaDB/MySQL
on this machine's servers, `SDPIPE_TEST_POSTGRES_URL` / `SDPIPE_TEST_MYSQL_URL` as in
tests/test_registry_servers.py, skipped saying why where none answers). Each bad input's message names the
row or column; no source is ever changed."""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from db_servers import SERVERS, admin_engine
from sdpipe.tabular import TableDataConfig, TableError, is_table_source, load_table, validate_table

FRAME = pd.DataFrame(
    {
        "id": range(1, 13),
        "age": [34, 45, None, 29, 31, 38, 41, 36, 33, 300, 34, 52],
        "height": [1.72, 1.8, 1.65, 1.9, 1.75, 1.7, 1.68, 1.71, 1.74, 1.73, 1.72, 1.77],
        "city": ["Paris", "Lyon", "Lyon", "Nice"] * 3,
        "member": [True, False, True] * 4,
    }
)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under `root` (or `root` itself): sha256 of its bytes, mtime_ns, mode."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, p.stat().st_mode) for p in files}


def error_of(cfg: TableDataConfig, out: Path) -> str:
    with pytest.raises(TableError) as info:
        validate_table(cfg, out)
    assert not (out / "report.json").exists()  # a failed run never leaves a report behind
    return str(info.value)


# -- CSV ---------------------------------------------------------------------------------------------------------


def test_csv_cells_are_read_as_text_with_quotes_bom_blank_lines_and_tabs(tmp_path: Path) -> None:
    f = write(tmp_path / "t.csv", '\ufeffname,note\n"Smith, J","two\nlines"\n\nAda,"say ""hi"""\n')
    raw = load_table(TableDataConfig(path=str(f)))
    assert list(raw.frame.columns) == ["name", "note"]  # the byte-order mark is not part of the first name
    assert raw.frame.to_dict("list") == {"name": ["Smith, J", "Ada"], "note": ["two\nlines", 'say "hi"']}
    assert raw.line_of_row == [2, 5] and raw.where(1) == "row 2 (line 5)"
    tsv = write(tmp_path / "t.tsv", "a\tb\n1\t2,5\n")
    assert load_table(TableDataConfig(path=str(tsv))).frame.to_dict("list") == {"a": ["1"], "b": ["2,5"]}
    semi = write(tmp_path / "s.csv", "a;b\n1;2\n")
    assert load_table(TableDataConfig(path=str(semi), delimiter=";")).frame.shape == (1, 2)
    before = snapshot(f)
    assert validate_table(TableDataConfig(path=str(f)), tmp_path / "out")["rows"] == 2
    assert snapshot(f) == before  # bytes, mode and modification time


def test_ragged_csv_names_the_row_line_and_field_counts(tmp_path: Path) -> None:
    f = write(tmp_path / "t.csv", "a,b,c\n1,2,3\n\n4,5\n6,7,8\n")
    msg = error_of(TableDataConfig(path=str(f)), tmp_path / "out")
    assert "row 2 (line 4) has 2 fields, expected 3" in msg and "a value is missing" in msg
    f = write(tmp_path / "u.csv", "a,b\n1,2\n3,4,5\n")
    assert "row 2 (line 3) has 3 fields, expected 2" in error_of(TableDataConfig(path=str(f)), tmp_path / "out")


def test_unreadable_encoding_names_the_byte_offset_row_and_line(tmp_path: Path) -> None:
    f = write(tmp_path / "t.csv", "a,b\n1,ok\n2,caf\xe9\n".encode("latin-1"))
    msg = error_of(TableDataConfig(path=str(f)), tmp_path / "out")
    assert "byte 0xe9 at offset 14 (row 2, line 3)" in msg and "data.encoding=latin-1" in msg
    raw = load_table(TableDataConfig(path=str(f), encoding="latin-1"))
    assert raw.frame["b"].tolist() == ["ok", "café"]
    header = write(tmp_path / "h.csv", b"caf\xe9,b\n1,2\n")
    assert "(in the header, line 1)" in error_of(TableDataConfig(path=str(header)), tmp_path / "out")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "the file is empty (0 bytes)"),
        ("\n\n", "the file is empty"),
        ("a,b\n", "no rows, only a header (a, b)"),
        ('a,b\n1,"x"y\n', "row 1 (line 2)"),
        ("a,a\n1,2\n", "names column 'a' twice"),
    ],
)
def test_empty_and_malformed_csv_say_what_is_wrong(tmp_path: Path, text: str, needle: str) -> None:
    f = write(tmp_path / "t.csv", text)
    assert needle in error_of(TableDataConfig(path=str(f)), tmp_path / "out")


def test_csv_folder_rows_follow_one_another_and_headers_must_match(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a.csv", "x,y\n1,2\n3,4\n")
    write(tmp_path / "d" / "b.csv", "x,y\n5,6\n")
    write(tmp_path / "d" / ".hidden.txt", "ignored")
    raw = load_table(TableDataConfig(path=str(tmp_path / "d")))
    assert raw.frame["x"].tolist() == ["1", "3", "5"] and raw.where(2) == "row 3 (b.csv, line 2)"
    write(tmp_path / "mixed" / "a.csv", "x\n1\n")
    write(tmp_path / "mixed" / "b.parquet", b"")
    assert "files of one kind" in error_of(TableDataConfig(path=str(tmp_path / "mixed")), tmp_path / "out")
    write(tmp_path / "d" / "c.csv", "x,z\n7,8\n")
    assert "differs from a.csv's" in error_of(TableDataConfig(path=str(tmp_path / "d")), tmp_path / "out")


# -- Parquet -----------------------------------------------------------------------------------------------------


def test_parquet_file_and_folder(tmp_path: Path) -> None:
    FRAME.to_parquet(tmp_path / "t.parquet")
    raw = load_table(TableDataConfig(path=str(tmp_path / "t.parquet")))
    assert raw.frame.shape == (12, 5) and raw.storage["height"] == "double"
    (tmp_path / "d").mkdir()
    FRAME.iloc[:5].to_parquet(tmp_path / "d" / "a.parquet")
    FRAME.iloc[5:].to_parquet(tmp_path / "d" / "b.parquet")
    raw = load_table(TableDataConfig(path=str(tmp_path / "d")))
    assert raw.frame["id"].tolist() == list(range(1, 13)) and raw.where(6) == "row 7 (b.parquet, row 2)"


def test_bad_parquet_inputs_are_named(tmp_path: Path) -> None:
    write(tmp_path / "junk.parquet", b"not parquet at all")
    assert "junk.parquet: not a readable Parquet file" in error_of(
        TableDataConfig(path=str(tmp_path / "junk.parquet")), tmp_path / "out"
    )
    FRAME.iloc[:0].to_parquet(tmp_path / "empty.parquet")
    assert "the table has no rows" in error_of(TableDataConfig(path=str(tmp_path / "empty.parquet")), tmp_path / "o")
    pq.write_table(pa.table({"a": [[1, 2], [3]]}), tmp_path / "nested.parquet")
    assert "column 'a' is nested" in error_of(TableDataConfig(path=str(tmp_path / "nested.parquet")), tmp_path / "o")


def test_image_parquet_is_not_taken_for_a_table(tmp_path: Path) -> None:
    pq.write_table(pa.table({"img": [{"bytes": b"\x89PNG", "path": None}], "label": ["x"]}), tmp_path / "i.parquet")
    pq.write_table(pa.table({"img": pa.array([b"\x89PNG"], pa.binary())}), tmp_path / "b.parquet")
    FRAME.to_parquet(tmp_path / "t.parquet")
    write(tmp_path / "photos" / "a.png", b"\x89PNG")
    assert not is_table_source(str(tmp_path / "i.parquet")) and not is_table_source(str(tmp_path / "b.parquet"))
    assert not is_table_source(str(tmp_path / "photos")) and not is_table_source("digits")
    assert is_table_source(str(tmp_path / "t.parquet")) and is_table_source(str(tmp_path / "missing.csv"))


# -- SQL ---------------------------------------------------------------------------------------------------------


def sqlite_db(path: Path) -> str:
    with sqlite3.connect(path) as con:
        FRAME.assign(member=FRAME.member.astype(int)).to_sql("people", con, index=False)
        con.execute("CREATE TABLE loose (x)")  # SQLite's columns take any type
        con.executemany("INSERT INTO loose VALUES (?)", [(1,), (2,), ("three",), (4,)])
    con.close()
    return f"sqlite:///{path}"


def test_sqlite_query_rows_and_types_and_the_file_untouched(tmp_path: Path) -> None:
    url = sqlite_db(tmp_path / "d.db")
    before = snapshot(tmp_path / "d.db")
    report = validate_table(TableDataConfig(db_url=url, sql="SELECT * FROM people"), tmp_path / "out")
    types = {c["name"]: c["type"] for c in report["schema"]}
    assert types == {"id": "id", "age": "integer", "height": "numeric", "city": "categorical", "member": "boolean"}
    assert report["rows"] == 12 and report["format"] == "sql" and report["query"] == "SELECT * FROM people"
    assert snapshot(tmp_path / "d.db") == before
    assert not (tmp_path / "out" / "source_files.parquet").exists()  # a query has no files to watch


def test_query_errors_give_the_database_message_and_no_change(tmp_path: Path) -> None:
    url = sqlite_db(tmp_path / "d.db")
    before = snapshot(tmp_path / "d.db")
    out = tmp_path / "out"
    assert "no such table: nope" in error_of(TableDataConfig(db_url=url, sql="SELECT * FROM nope"), out)
    msg = error_of(TableDataConfig(db_url=url, sql="DELETE FROM people RETURNING *"), out)
    assert "readonly" in msg.replace("-", "").replace(" ", "")  # refused by the read-only guard
    assert "returned no rows" in error_of(TableDataConfig(db_url=url, sql="SELECT * FROM people WHERE 0"), out)
    assert "no result set" in error_of(TableDataConfig(db_url=url, sql="PRAGMA query_only = 1"), out)
    mixed = error_of(TableDataConfig(db_url=url, sql="SELECT x FROM loose"), out)
    assert "column 'x' mixes types: number in row 1: '1'; text in row 3: 'three'" in mixed
    assert snapshot(tmp_path / "d.db") == before
    assert "no SQLite database file" in error_of(
        TableDataConfig(db_url=f"sqlite:///{tmp_path}/no.db", sql="SELECT 1"), out
    )
    assert not (tmp_path / "no.db").exists()  # SQLite would have made an empty one


def test_password_is_masked_in_query_errors(tmp_path: Path) -> None:
    url = "postgresql+psycopg://ann:s3cret-pw@127.0.0.1:1/db"  # nothing listens on port 1
    msg = error_of(TableDataConfig(db_url=url, sql="SELECT 1"), tmp_path / "out")
    assert "s3cret-pw" not in msg and "ann:***@127.0.0.1:1/db" in msg and "the query failed" in msg


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a fresh database on a server (dropped after the module), or a skip saying why."""
    admin = admin_engine(request.param, "table queries")
    name = f"sdpipe_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    yield admin.url.set(database=name).render_as_string(hide_password=False)
    force = " WITH (FORCE)" if admin.dialect.name == "postgresql" else ""
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE {name}{force}")
    admin.dispose()


def test_server_query_types_read_only_and_masked_errors(server: str, tmp_path: Path) -> None:
    table = f"t_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(server)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {table} (id INTEGER, price NUMERIC(10, 2), born DATE, seen TIMESTAMP NULL, "
            "ok BOOLEAN, city VARCHAR(20))"
        )
        conn.exec_driver_sql(
            f"INSERT INTO {table} VALUES (1, 1.50, '2020-01-01', '2020-01-01 10:00:00', TRUE, 'Paris'), "
            "(2, 2.25, '2021-02-02', '2021-02-02 11:00:00', FALSE, 'Lyon'), (3, NULL, NULL, NULL, NULL, 'Paris'), "
            "(4, 4.00, '2022-03-04', '2022-03-04 00:00:00', TRUE, 'Lyon')"
        )
    try:
        report = validate_table(TableDataConfig(db_url=server, sql=f"SELECT * FROM {table}"), tmp_path / "out")
        types = {c["name"]: c["type"] for c in report["schema"]}
        assert types == {
            "id": "id",
            "price": "numeric",
            "born": "datetime",
            "seen": "datetime",
            "ok": "boolean",  # MariaDB stores it as 0/1
            "city": "categorical",
        }
        assert report["rows"] == 4 and report["schema"][1]["missing"] == 1
        password = sa.engine.make_url(server).password
        assert f":{password}@" not in report["source"] and ":***@" in report["source"]
        assert f":{password}@" not in (tmp_path / "out" / "report.json").read_text()
        msg = error_of(TableDataConfig(db_url=server, sql=f"DELETE FROM {table}"), tmp_path / "o")
        assert "read-only" in msg.lower() or "read only" in msg.lower()
        assert f":{password}@" not in msg
        assert "nope" in error_of(TableDataConfig(db_url=server, sql="SELECT * FROM nope"), tmp_path / "o")
        with engine.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT COUNT(*) FROM {table}").scalar() == 4
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
        engine.dispose()
