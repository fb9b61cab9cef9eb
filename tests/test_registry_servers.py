"""The registry on database servers: PostgreSQL (`SDPIPE_TEST_POSTGRES_URL`) and MySQL/MariaDB
(`SDPIPE_TEST_MYSQL_URL`), each the URL of a server and a role that may create databases named
`sdpipe_test_*`, e.g. `postgresql+psycopg://sdpipe_test:sdpipe_test@127.0.0.1:5432/postgres`.

`make test` (and so `.ci/run`) sets both to throwaway roles on this machine's servers (`make databases` makes
them); the tests are skipped, saying why, where a variable is unset or empty, its driver is missing, or no
server answers."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import race_registry_versions
from db_servers import SERVERS, admin_engine
from sdpipe.registry import Registry, RegistryError, resolve
from sdpipe.registry.db import events, metadata, versions
from test_registry import make_model


@pytest.fixture(scope="module", params=list(SERVERS))
def admin(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    """The server's admin connection, or a skip saying why there is none."""
    engine = admin_engine(request.param, "the registry")
    yield engine
    engine.dispose()


@pytest.fixture
def db_url(admin: sa.Engine) -> Iterator[str]:
    """A fresh, empty database for one test, dropped after it."""
    name = f"sdpipe_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    yield admin.url.set(database=name).render_as_string(hide_password=False)
    force = " WITH (FORCE)" if admin.dialect.name == "postgresql" else ""
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE {name}{force}")


def test_register_alias_rollback_history(db_url: str, tmp_path: Path, monkeypatch) -> None:
    reg = Registry(db_url, tmp_path / "store")
    a = make_model(tmp_path / "a" / "model", 0, metrics={"note": "it's fine"})
    b = make_model(tmp_path / "b" / "model", 1)
    assert [reg.register(m, "digits").version for m in (a, b, a)] == [1, 2, 1]
    reg.alias("digits", "production", 1)
    reg.alias("digits", "production", 2)
    assert reg.rollback("digits", "production").version == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("digits", "production")
    shown = reg.show("digits@production")
    assert shown.lineage["metrics"] == {"note": "it's fine"} and shown.aliases == ["production"]
    assert [e.action for e in reg.history("digits")] == [
        "register",
        "register",
        "register",
        "alias",
        "alias",
        "rollback",
    ]
    assert reg.history()[0].user == shown.user
    with reg.engine.connect() as conn, pytest.raises(sa.exc.DatabaseError, match="append-only"):
        conn.exec_driver_sql("DELETE FROM events")
    monkeypatch.setenv("SDPIPE_REGISTRY_STORE", str(tmp_path / "store"))  # for other databases than SQLite
    assert resolve("digits@production", db_url) == tmp_path / "store" / "digits" / "1"
    with pytest.raises(RegistryError, match=r"no model named 'faces' .*\(models: digits\)"):
        reg.show("faces")
    assert reg.verify("digits:2").version == 2
    reg.engine.dispose()


def test_an_older_database_gets_the_append_only_triggers(db_url: str, tmp_path: Path) -> None:
    old = sa.create_engine(db_url)
    metadata.create_all(old)  # the tables as an older sdpipe made them, without triggers
    stamp, user = "2026-01-01T00:00:00+00:00", "alice"
    row = {"name": "digits", "version": 1, "weights_hash": "sha256:1", "content_hash": "sha256:2"}
    with old.begin() as conn:
        conn.execute(versions.insert().values(**row, dataset_id="d", lineage={}, created_at=stamp, user=user))
        event = {"time": stamp, "user": user, "action": "register", "name": "digits", "version": 1, "detail": {}}
        conn.execute(events.insert().values(**event))
        conn.execute(versions.update().values(user="mallory"))  # possible, then
    old.dispose()
    refused = {
        "UPDATE versions SET weights_hash = 'sha256:0'": "registered versions are append-only",
        "DELETE FROM versions": "registered versions are append-only",
        "DELETE FROM events": "the events log is append-only",
    }
    for _ in range(2):  # opening installs the triggers; opening again changes nothing
        reg = Registry(db_url, tmp_path / "store")
        for statement, message in refused.items():
            with reg.engine.connect() as conn, pytest.raises(sa.exc.DatabaseError, match=message):
                conn.exec_driver_sql(statement)
        assert reg.show("digits:1").user == "mallory"
        reg.engine.dispose()


@pytest.mark.parametrize("same_model", [False, True])
def test_racing_registrations(db_url: str, tmp_path: Path, monkeypatch, same_model: bool) -> None:

    a, b = (make_model(tmp_path / f"m{i}" / "model", i) for i in range(2))
    opened: list[Registry] = []
    starters = [threading.Thread(target=lambda: opened.append(Registry(db_url, tmp_path / "store"))) for _ in range(4)]
    for t in starters:  # first use by several at once: the tables are created once, without errors
        t.start()
    for t in starters:
        t.join()
    assert len(opened) == 4
    both_read, waited = race_registry_versions(monkeypatch)
    results: dict[int, object] = {}
    models = [a, a if same_model else b]
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, opened[i].register(models[i], "digits")))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(waited) == 2 and not both_read.broken
    found = [results[0], results[1]]
    expected = [1, 1] if same_model else [1, 2]
    assert sorted(v.version for v in found) == expected  # type: ignore[attr-defined]
    for reg in opened:
        reg.engine.dispose()


def test_an_older_database_gets_the_new_columns(db_url: str, tmp_path: Path, sd1_pipeline: Path) -> None:
    """`ALTER TABLE versions ADD COLUMN` for kind, architecture, ... on the server, by several openers at once."""
    from test_registry_sd import check_migrated, make_old_database

    make_old_database(db_url)
    check_migrated(db_url, tmp_path / "store", sd1_pipeline)
