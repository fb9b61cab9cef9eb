"""The local database servers the registry's and the tables' tests run against (see the Makefile's
`databases`): their URLs from the environment, and an admin engine or a skip that says why there is none."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

SERVERS = {"postgresql": "SDPIPE_TEST_POSTGRES_URL", "mysql": "SDPIPE_TEST_MYSQL_URL"}


def admin_engine(server: str, purpose: str) -> sa.Engine:
    """An AUTOCOMMIT engine on `server` ("postgresql" | "mysql") that answers, or pytest.skip naming why."""
    variable = SERVERS[server]
    url = os.environ.get(variable, "")
    if not url:
        pytest.skip(f"set {variable} to test {purpose} on {server}")
    try:
        engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect():
            pass
    except ImportError as exc:
        pytest.skip(f"{variable}: the driver of {url.split(':')[0]} is not installed ({exc})")
    except sa.exc.DBAPIError as exc:
        where = engine.url.render_as_string(hide_password=True)
        pytest.skip(f"no {server} server answers at {where} ({variable}): {exc.orig}")
    return engine
