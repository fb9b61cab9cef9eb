"""Every page the server serves works offline: nothing it serves as HTML loads anything from another host."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from sdpipe.serve.app import create_app
from sdpipe.serve.docs import asset_folder
from sdpipe.serve.settings import ServeSettings
from test_serve import make_model, wait_ready

OUTSIDE = re.compile(r"https?://|(?:src|href|url)\s*[=(]\s*[\"']?//", re.IGNORECASE)
REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|\burl:\s*'([^']+)'""")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    model = make_model(tmp_path_factory.mktemp("docs") / "model")
    with TestClient(create_app(lambda: model, ServeSettings())) as c:
        wait_ready(c)
        yield c


def html_pages(client: TestClient) -> dict[str, str]:
    """Each GET route of the app that answers with HTML, by path."""
    paths = [r.path for r in client.app.routes if "GET" in getattr(r, "methods", ()) and "{" not in r.path]
    found = {path: client.get(path) for path in paths}
    return {path: r.text for path, r in found.items() if r.headers["content-type"].startswith("text/html")}


def test_no_page_references_another_host(client: TestClient) -> None:
    pages = html_pages(client)
    assert "/" in pages and ("/docs" in pages) == (asset_folder() is not None)
    for path, html in pages.items():
        assert not OUTSIDE.findall(html), (path, OUTSIDE.findall(html))
        for found in REFERENCE.findall(html):  # what it loads is served right here (or inline data)
            ref = next(r for r in found if r)
            if ref.startswith("data:"):
                continue
            assert client.get(ref if ref.startswith("/") else "/" + ref).status_code == 200, (path, ref)
    assert client.get("/redoc").status_code == 404  # its script would come from a CDN
    assert client.get("/openapi.json").json()["info"]["title"] == "sdpipe"


@pytest.mark.skipif(asset_folder() is None, reason="/docs needs the fastapi-offline package (Swagger UI's files)")
def test_docs_are_served_from_here(client: TestClient) -> None:
    html = client.get("/docs").text
    assert '"validatorUrl": null' in html  # else Swagger UI asks validator.swagger.io for a badge
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"):
        assert f'"/docs-assets/{name}"' in html
        r = client.get(f"/docs-assets/{name}")
        assert r.status_code == 200 and len(r.content) > 100
