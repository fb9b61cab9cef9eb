"""The HTTP API (FastAPI): `POST /v1/generate`, health and readiness, Prometheus metrics, model reload, web page.

`create_app(resolver, settings, api_keys)` builds one server: a `ModelHolder` (which model, swapped on
change) and a `Batcher` (bounded queue, one worker thread running merged batches). Request limits come
from `ServeSettings`, so the request model is built per app; a bad request gets 422 naming the field.
"""

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdpipe import sampler_names
from sdpipe.sampling import samplers_for
from sdpipe.sampling.files import parse_labels
from sdpipe.serve.batching import Batcher, GenerateJob, InvalidRequest, QueueFull, sample_spec
from sdpipe.serve.docs import add_docs
from sdpipe.serve.holder import ModelHolder, Resolver
from sdpipe.serve.metrics import ServeMetrics
from sdpipe.serve.page import PAGE
from sdpipe.serve.settings import MAX_SEED, ServeSettings

log = logging.getLogger("sdpipe.serve")


class ImageOut(BaseModel):
    png_base64: str
    seed: int
    label: str | None


class GenerateResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str = Field(description="content hash of the weights that made the images")
    images: list[ImageOut]


class ErrorOut(BaseModel):
    detail: str


class GenerateRequest(BaseModel):
    """The body of `POST /v1/generate`; options left out take the model's own defaults. The bounds here are
    the widest; each server narrows them to its settings (`request_model`)."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field("all", min_length=1, max_length=64, description="a class name, or 'all' to cycle")
    n: int = Field(ge=1, description="number of images; image i has seed seed+i")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=1000)
    sampler: str | None = Field(
        None, max_length=64, description="a sampler's sdpipe or web-UI name: " + sampler_names.choices()
    )
    guidance: float | None = Field(None, ge=0, le=20, allow_inf_nan=False)


def request_model(s: ServeSettings) -> type[GenerateRequest]:
    """`GenerateRequest` with this server's limits, for validation and for the OpenAPI spec."""
    return create_model(
        "GenerateRequest",
        __base__=GenerateRequest,
        n=(int, Field(ge=1, le=s.max_n, description="number of images; image i has seed seed+i")),
        steps=(int | None, Field(None, ge=1, le=s.max_steps)),
        guidance=(float | None, Field(None, ge=s.guidance_min, le=s.guidance_max, allow_inf_nan=False)),
    )


def _invalid(field: str | None, message: str) -> JSONResponse:
    loc = ["body", field] if field else ["body"]
    return JSONResponse({"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}, status_code=422)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 listing each bad field; the offending input is not echoed (it may not even be valid JSON, e.g. NaN)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    return JSONResponse({"detail": detail}, status_code=422)


class _MetricsMiddleware:
    """Counts every response by path and status and times it (plain ASGI: no per-request overhead to speak of)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(scope["path"], status, time.perf_counter() - t0)


def key_digest(key: bytes) -> bytes:
    """What API keys are compared by: their SHA-256, so that every comparison is of 32 bytes with 32 bytes."""
    return hashlib.sha256(key).digest()


def _auth_dependency(api_keys: list[str] | None) -> Any:
    """A dependency that requires `Authorization: Bearer KEY` with one of `api_keys` (none: no check).
    The key given is compared with every key, by digest (`key_digest`) with `hmac.compare_digest`, so the
    time taken tells neither which bytes matched nor how long the keys are."""
    digests = [key_digest(k.encode()) for k in api_keys or []]
    bearer = HTTPBearer(auto_error=False, description="required when the server was started with --api-key-file")

    async def check(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not digests:
            return
        given = key_digest(creds.credentials.encode("latin-1") if creds is not None else b"")  # the bytes as sent
        ok = False
        for digest in digests:
            ok |= hmac.compare_digest(given, digest)
        if not ok:
            raise HTTPException(
                401, "missing or wrong API key: send Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"}
            )

    return check


def create_app(resolver: Resolver, settings: ServeSettings | None = None, api_keys: list[str] | None = None) -> FastAPI:
    """One server for the model `resolver()` names (asked again every `settings.poll_s` seconds)."""
    settings = settings or ServeSettings()
    metrics = ServeMetrics()
    holder = ModelHolder(resolver, metrics, settings.poll_s)
    batcher = Batcher(settings, lambda: holder.current, metrics)
    auth = Depends(_auth_dependency(api_keys))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        holder.start()
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)
        await run_in_threadpool(holder.stop)

    app = FastAPI(title="sdpipe", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    add_docs(app)  # /docs with its files served here, not from a CDN
    app.state.holder, app.state.batcher, app.state.metrics = holder, batcher, metrics
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    Responses = dict[int | str, dict[str, Any]]
    busy: Responses = {429: {"model": ErrorOut, "description": "queue full: retry after Retry-After seconds"}}
    unavailable: Responses = {503: {"model": ErrorOut, "description": "model loading, timed out, or shutting down"}}
    denied: Responses = {401: {"model": ErrorOut, "description": "missing or wrong API key"}}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive and answering (even while it loads a model or generates)."""
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"model": ErrorOut, "description": "not ready yet"}})
    async def readyz() -> JSONResponse:
        """200 once a model is loaded and its warm-up generation succeeded."""
        model = holder.current
        if model is None:
            return JSONResponse({"status": "loading", "detail": holder.error}, status_code=503)
        return JSONResponse({"status": "ready", "model": model.meta.weights_hash})

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/model", responses=unavailable)
    async def model_info() -> dict[str, Any]:
        """The served model, its default sampling settings and this server's request limits."""
        model = holder.current
        if model is None:
            raise HTTPException(503, "the model is still loading; retry shortly", {"Retry-After": "5"})
        spec = sample_spec(model, None, None, None)
        limits = settings.model_dump(include={"max_n", "max_steps", "guidance_min", "guidance_max"})
        return {
            "model": model.meta.weights_hash,
            "class_names": model.meta.class_names,
            "image_size": model.meta.image_size,
            "channels": model.meta.channels,
            "samplers": samplers_for(model.scheduler_config),
            "defaults": {"sampler": spec.sampler, "steps": spec.steps, "guidance": spec.guidance},
            "limits": limits | {"max_seed": MAX_SEED},
        }

    async def generate(req: GenerateRequest) -> Any:
        """n images for a label, bitwise the ones `sdpipe generate` writes for the same settings and seeds."""
        model = holder.current
        if model is None:
            raise HTTPException(503, "the model is still loading; retry shortly", {"Retry-After": "5"})
        try:
            parse_labels(req.label, req.n, model.meta.class_names)
        except ValueError as exc:
            return _invalid("label", str(exc))
        usable = samplers_for(model.scheduler_config)
        try:
            sampler = None if req.sampler is None else sampler_names.resolve(req.sampler)
        except ValueError as exc:
            return _invalid("sampler", str(exc))
        if sampler is not None and sampler not in usable:
            return _invalid("sampler", f"{req.sampler!r} does not apply to this model; use one of: {', '.join(usable)}")
        job = GenerateJob(req.n, req.seed, req.label, req.steps, sampler, req.guidance)
        try:
            batcher.submit(job)
        except QueueFull as full:
            raise HTTPException(429, str(full), {"Retry-After": str(full.retry_after_s)}) from None
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(job.future), settings.timeout_s)
        except asyncio.TimeoutError:
            msg = f"not answered within {settings.timeout_s:g} s (server busy); retry later"
            raise HTTPException(503, msg, {"Retry-After": "1"}) from None
        except InvalidRequest as exc:  # e.g. a label the model swapped in meanwhile does not have
            return _invalid(exc.field, str(exc))
        except RuntimeError as exc:  # shutting down
            raise HTTPException(503, str(exc)) from None
        return {"model": result.model, "images": [im.__dict__ for im in result.images]}

    generate.__annotations__["req"] = request_model(settings)  # this server's limits
    app.post(
        "/v1/generate", response_model=GenerateResponse, dependencies=[auth], responses=denied | busy | unavailable
    )(generate)

    @app.post("/admin/reload", dependencies=[auth], responses=denied | unavailable)
    async def reload() -> dict[str, Any]:
        """Resolve the model reference now; load and swap in the model if it changed."""
        try:
            changed = await run_in_threadpool(holder.refresh)
        except Exception as exc:
            served = holder.identity.weights_hash if holder.identity else "nothing"
            raise HTTPException(503, f"reload failed ({type(exc).__name__}: {exc}); still serving {served}") from None
        return {"changed": changed, "model": holder.identity.weights_hash if holder.identity else None}

    return app
