"""The registry on PostgreSQL. Skipped unless SDPIPE_TEST_POSTGRES_URL names a server the test may create
databases on, e.g. `postgresql+pg8000://postgres@127.0.0.1:5432/postgres` (with that driver installed)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from sdpipe.registry import Registry, RegistryError, resolve
from test_registry import make_model

ADMIN_URL = os.environ.get("SDPIPE_TEST_POSTGRES_URL", "")
pytestmark = pytest.mark.skipif(not ADMIN_URL, reason="set SDPIPE_TEST_POSTGRES_URL to test on PostgreSQL")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database for one test, dropped after it."""
    name = f"sdpipe_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    admin.dispose()


def test_register_alias_rollback_history_on_postgres(pg_url: str, tmp_path: Path, monkeypatch) -> None:
    reg = Registry(pg_url, tmp_path / "store")
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
    assert resolve("digits@production", pg_url) == tmp_path / "store" / "digits" / "1"
    with pytest.raises(RegistryError, match=r"no model named 'faces' .*\(models: digits\)"):
        reg.show("faces")
    assert reg.verify("digits:2").version == 2


@pytest.mark.parametrize("same_model", [False, True])
def test_racing_registrations_on_postgres(pg_url: str, tmp_path: Path, monkeypatch, same_model: bool) -> None:
    from sdpipe.registry import core

    a, b = (make_model(tmp_path / f"m{i}" / "model", i) for i in range(2))
    opened: list[Registry] = []
    starters = [threading.Thread(target=lambda: opened.append(Registry(pg_url, tmp_path / "store"))) for _ in range(4)]
    for t in starters:  # first use by several at once: the tables are created once, without errors
        t.start()
    for t in starters:
        t.join()
    assert len(opened) == 4
    both_read, waited, real_now = threading.Barrier(2), set(), core.now

    def now_after_both_read() -> str:
        if threading.get_ident() not in waited:
            waited.add(threading.get_ident())
            both_read.wait(timeout=20)
        return real_now()

    monkeypatch.setattr(core, "now", now_after_both_read)
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
