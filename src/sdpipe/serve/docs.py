"""`GET /docs`: FastAPI's Swagger UI with its script, style and icon served by this server, never a CDN, so
the page works offline. The files are those the `fastapi-offline` package ships; where it is not installed
`/docs` is not offered. `/openapi.json` always is; ReDoc (`/redoc`, another CDN script) is not offered."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")


def asset_folder() -> Path | None:
    """The folder holding Swagger UI's files, or None where they are not installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if all((folder / name).is_file() for name in FILES) else None


def add_docs(app: FastAPI) -> bool:
    """Serve `/docs` and its files from this server; False (and no `/docs`) where the files are missing."""
    folder = asset_folder()
    if folder is None or app.openapi_url is None:
        return False
    app.mount(ASSETS, StaticFiles(directory=folder), name="docs-assets")
    openapi_url = app.openapi_url

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        js, css, icon = (f"{root}{ASSETS}/{name}" for name in FILES)
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} API",
            swagger_js_url=js,
            swagger_css_url=css,
            swagger_favicon_url=icon,
            swagger_ui_parameters={"validatorUrl": None},  # else the page asks an online validator for a badge
        )

    return True
