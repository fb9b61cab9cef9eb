"""`sdpipe serve` for a table model: a small FastAPI app beside the image server (`serve.app`), chosen by
`sdpipe serve` when the model is a table model (sdpipe.json `"kind": "table"`, a folder or a registry version).

    POST /v1/generate  {"n": 100, "seed": 0, "condition": {"species": "Gentoo"}, "format": "json" | "csv"}
        -> {"model", "columns", "rows": [{...}, ...]} (JSON records; a missing cell is null) or text/csv
    POST /v1/impute    {"rows": [{...}, ...], "draws": 10, "seed": 0}
        -> {"model", "rows": [filled records], "cells": [{"row", "column", "value", "low", "high", "shares"}]}
    GET /v1/model, /healthz, /readyz

Rows are `sdpipe generate` / `sdpipe impute`'s, bitwise (row i: seed S + i; draw k of row j: S + j*K + k).
Request limits: n at most `max_n` × 16 rows, at most `max_n` × 16 rows to impute with at most 100 draws
(`--set max_n=...`); a bad field, an unknown column or a category the model never saw is a 422 naming it.
The model is loaded once, before the server listens (a registry version checked against its registration);
requests run one at a time on a worker thread. The image server's batching, swaps and web page do not apply.
"""

import functools
import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from sdpipe.config import MAX_SEED
from sdpipe.serve.settings import ServeSettings

if TYPE_CHECKING:
    import pandas as pd

    from sdpipe.tabular.commands import LoadedTable

ROWS_PER_N = 16  # a table request may ask for max_n x this many rows: rows are far cheaper than images
MAX_DRAWS = 100


def records(frame: "pd.DataFrame") -> list[dict[str, Any]]:
    """A frame as JSON-ready records: numpy scalars as Python ones, a missing cell (NaN, NA, NaT) as None,
    a datetime as its ISO text."""
    import pandas as pd

    out = []
    for row in frame.astype(object).itertuples(index=False, name=None):
        item: dict[str, Any] = {}
        for name, v in zip(frame.columns, row, strict=True):
            if v is None or (not isinstance(v, str) and pd.isna(v)):
                item[str(name)] = None
            elif isinstance(v, pd.Timestamp):
                item[str(name)] = v.isoformat()
            else:
                item[str(name)] = v.item() if hasattr(v, "item") else v
        out.append(item)
    return out


def _cells(cells: "pd.DataFrame") -> list[dict[str, Any]]:
    found = records(cells.drop(columns=["shares"]))
    for item, shares in zip(found, cells["shares"], strict=True):
        item["shares"] = None if shares is None else {str(k): float(v) for k, v in shares.items()}
        for key in ("low", "high"):
            if isinstance(item[key], float) and math.isnan(item[key]):
                item[key] = None
    return found


def _invalid(field: str, message: str) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["body", field], "msg": message, "type": "value_error"}]}, 422)


def create_table_app(load: Any, settings: ServeSettings | None = None, api_keys: list[str] | None = None) -> FastAPI:
    """The server of the table model `load()` returns (a `LoadedTable`; called once, by `start` or the first
    request)."""
    from sdpipe.serve.app import _auth_dependency, _validation_error

    # no `from __future__ import annotations` here: FastAPI reads the request models from the annotations
    settings = settings or ServeSettings()
    max_rows = settings.max_n * ROWS_PER_N
    auth = Depends(_auth_dependency(api_keys))
    state: dict[str, Any] = {"model": None, "error": None}
    lock = threading.Lock()  # one request runs at a time: torch's threads are shared

    class GenerateRows(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int = Field(default=10, ge=0, le=max_rows)
        seed: int = Field(default=0, ge=0, le=MAX_SEED)
        condition: dict[str, Any] | None = Field(default=None, max_length=256)
        format: Literal["json", "csv"] = "json"

    class ImputeRows(BaseModel):
        model_config = ConfigDict(extra="forbid")
        rows: list[dict[str, Any]] = Field(min_length=1, max_length=max_rows)
        draws: int = Field(default=10, ge=1, le=MAX_DRAWS)
        seed: int = Field(default=0, ge=0, le=MAX_SEED)

    def model() -> "LoadedTable":
        with lock:
            if state["model"] is None:
                state["model"] = load()
            return state["model"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.threads is not None:
            import torch

            torch.set_num_threads(settings.threads)
        yield

    app = FastAPI(title="sdpipe (table model)", version="1", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.state.load_model = model

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if state["model"] is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model": state["model"].hash})

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        """The served table model: its columns and types, and this server's limits."""
        loaded = await run_in_threadpool(model)
        pre = loaded.model.preprocessor
        return {
            "model": loaded.hash,
            "kind": "table",
            "takes": "condition",
            "columns": [
                {"name": c.name, "type": c.type, "generated": c.role in ("number", "category")} for c in pre.columns
            ],  # fmt: skip
            "limits": {"max_n": max_rows, "max_rows": max_rows, "max_draws": MAX_DRAWS, "max_seed": MAX_SEED},
        }

    def _generate(req: GenerateRows) -> "tuple[LoadedTable, pd.DataFrame]":
        from sdpipe.tabular.commands import check_seed, generate_frame

        loaded = model()
        check_seed(req.seed, req.n)
        with lock:
            return loaded, generate_frame(loaded, req.n, req.seed, req.condition)

    @app.post("/v1/generate", dependencies=[auth])
    async def generate(req: GenerateRows) -> Any:
        """`n` new rows (row i from seed + i: the same rows whatever n), with `condition`'s columns fixed."""
        try:
            loaded, frame = await run_in_threadpool(_generate, req)
        except ValueError as exc:
            field = "seed" if str(exc).startswith("--seed") else "condition"
            return _invalid(field, str(exc).replace("--seed", "seed"))
        if req.format == "csv":
            return Response(frame.to_csv(index=False), media_type="text/csv")
        return {"model": loaded.hash, "columns": list(frame.columns), "rows": records(frame)}

    def _impute(req: ImputeRows) -> "tuple[LoadedTable, Any]":
        from sdpipe.tabular.commands import impute_frame, rows_from_records

        loaded = model()
        frame = rows_from_records(loaded, req.rows)
        with lock:
            return loaded, impute_frame(loaded, frame, req.draws, req.seed)

    @app.post("/v1/impute", dependencies=[auth])
    async def impute(req: ImputeRows) -> Any:
        """The rows with their missing cells filled (observed cells unchanged), and per filled cell its value,
        interval (numbers: the 2.5 % and 97.5 % draws) or shares (categories)."""
        try:
            loaded, result = await run_in_threadpool(_impute, req)
        except ValueError as exc:  # TableError and PreprocessError are ValueErrors: an unknown column, a bad cell
            field = "seed" if str(exc).startswith("--seed") else "rows"
            return _invalid(field, str(exc).replace("--seed", "seed"))
        return {"model": loaded.hash, "rows": records(result.frame), "cells": _cells(result.cells)}

    app.state.holder = _Preload(model)  # `sdpipe serve` loads the model (and fails) before it listens
    return app


class _Preload:
    """What `sdpipe serve` calls before listening (the image server's `ModelHolder.refresh`)."""

    def __init__(self, load: Any) -> None:
        self.refresh = load


def table_app_for(
    ref: str,
    registry_url: str | None,
    device: str,
    dtype: str,
    settings: ServeSettings,
    api_keys: list[str] | None,
) -> FastAPI | None:
    """The table server when `ref` is a table model (a folder or a registry version), else None."""
    from sdpipe.tabular.commands import load_table_ref, table_model_path

    found = table_model_path(ref, registry_url)
    if found is None:
        return None
    return create_table_app(functools.partial(load_table_ref, found, device, dtype, registry_url), settings, api_keys)
