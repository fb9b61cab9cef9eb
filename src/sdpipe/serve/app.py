"""The HTTP API (FastAPI): `POST /v1/generate`, the web UI's API (`/sdapi/v1/*`, see `sdpipe.serve.sdapi`),
health and readiness, Prometheus metrics, model reload, web page.

`create_app(resolver, settings, api_keys)` builds one server: a `ModelHolder` (which model, swapped on
change) and a `Batcher` (bounded queue, one worker thread running merged batches). The model is a pixel-space
class model (requests give a label) or a Stable Diffusion model (requests give a prompt). Request limits come
from `ServeSettings`, so the request model is built per app; a bad request gets 422 naming the field.
"""

import base64
import binascii
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
from sdpipe.models.pipelines import LoadedPipeline
from sdpipe.sampling import samplers_for
from sdpipe.sampling.files import parse_labels
from sdpipe.serve import sdapi
from sdpipe.serve.batching import (
    AnyModel,
    Batcher,
    GenerateJob,
    InvalidRequest,
    JobResult,
    model_hash,
    sample_spec,
    sd_conditions,
    sd_fields_given,
)
from sdpipe.serve.common import base64_bytes, base64_limit, current_model, invalid, run_job
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
    prompt: str | None = None


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
    # Stable Diffusion models (a pixel-space class model refuses them, naming the field)
    prompt: str | None = Field(None, max_length=100_000, description="text-to-image models: what to draw")
    negative_prompt: str = Field("", max_length=100_000, description="what the images should not show")
    width: int | None = Field(None, ge=8, le=16384, multiple_of=8, description="pixels (default: the model's)")
    height: int | None = Field(None, ge=8, le=16384, multiple_of=8, description="pixels (default: the model's)")
    clip_skip: int = Field(1, ge=1, le=12, description="text-encoder layers to skip, web-UI style (1 = none)")
    image: str | None = Field(None, description="img2img/inpainting: the input image, base64 (PNG, JPEG, WebP)")
    mask: str | None = Field(None, description="inpainting: white = repaint, black = keep; base64")
    strength: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="how much of the image to repaint (0.8; 1 with a mask)"
    )


def request_model(s: ServeSettings) -> type[GenerateRequest]:
    """`GenerateRequest` with this server's limits, for validation and for the OpenAPI spec."""
    image_chars = base64_limit(s.max_image_mib)
    return create_model(
        "GenerateRequest",
        __base__=GenerateRequest,
        n=(int, Field(ge=1, le=s.max_n, description="number of images; image i has seed seed+i")),
        steps=(int | None, Field(None, ge=1, le=s.max_steps)),
        guidance=(float | None, Field(None, ge=s.guidance_min, le=s.guidance_max, allow_inf_nan=False)),
        prompt=(str | None, Field(None, max_length=s.max_prompt_chars, description="text-to-image models")),
        negative_prompt=(str, Field("", max_length=s.max_prompt_chars)),
        width=(int | None, Field(None, ge=8, le=s.max_width, multiple_of=8, description="pixels, a multiple of 8")),
        height=(int | None, Field(None, ge=8, le=s.max_height, multiple_of=8, description="pixels, a multiple of 8")),
        image=(str | None, Field(None, max_length=image_chars, description="img2img: the input image, base64")),
        mask=(str | None, Field(None, max_length=image_chars, description="inpainting: the mask, base64")),
    )


_invalid = invalid


def check_size(model: LoadedPipeline, job: GenerateJob, conds: list, settings: ServeSettings) -> None:
    """The size an image will have (its own when an input image sets it) within this server's limits."""
    height, width = model.parts.size(conds[0])
    for name, value, limit in (("width", width, settings.max_width), ("height", height, settings.max_height)):
        if value > limit:
            field = job.name_of(name) if getattr(job, name) is not None else job.name_of("image")
            raise InvalidRequest(field, f"{name} {value} is above this server's limit of {limit}")


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


def _key_matches(given: bytes, digests: list[bytes]) -> bool:
    """Whether `given` is one of the keys: compared with every key's digest, so the time taken tells neither
    which bytes matched nor how long the keys are."""
    digest = key_digest(given)
    ok = False
    for known in digests:
        ok |= hmac.compare_digest(digest, known)
    return ok


def _auth_dependency(api_keys: list[str] | None) -> Any:
    """A dependency that requires `Authorization: Bearer KEY` with one of `api_keys` (none: no check).
    The key given is compared with every key, by digest (`key_digest`) with `hmac.compare_digest`, so the
    time taken tells neither which bytes matched nor how long the keys are."""
    digests = [key_digest(k.encode()) for k in api_keys or []]
    bearer = HTTPBearer(auto_error=False, description="required when the server was started with --api-key-file")

    async def check(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not digests:
            return
        given = creds.credentials.encode("latin-1") if creds is not None else b""  # the bytes as sent
        if not _key_matches(given, digests):
            raise HTTPException(
                401, "missing or wrong API key: send Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"}
            )

    return check


def _webui_auth_dependency(api_keys: list[str] | None) -> Any:
    """The web-UI API's keys: `Authorization: Bearer KEY`, or HTTP Basic with the key as the password (any user
    name), which is how web-UI clients authenticate (the web UI's `--api-auth`; `webuiapi`'s `set_auth`)."""
    digests = [key_digest(k.encode()) for k in api_keys or []]
    bearer = HTTPBearer(auto_error=False, description="required when the server was started with --api-key-file")

    async def check(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not digests:
            return
        given = b""
        if creds is not None:
            given = creds.credentials.encode("latin-1")
        else:
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() == "basic":
                try:
                    given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
                except (binascii.Error, ValueError):
                    given = b""
        if not _key_matches(given, digests):
            raise HTTPException(
                401,
                "missing or wrong API key: send Authorization: Bearer KEY, or Basic auth with the key as password",
                {"WWW-Authenticate": 'Bearer, Basic realm="sdpipe"'},
            )

    return check


def create_app(resolver: Resolver, settings: ServeSettings | None = None, api_keys: list[str] | None = None) -> FastAPI:
    """One server for the model `resolver()` names (asked again every `settings.poll_s` seconds)."""
    settings = settings or ServeSettings()
    metrics = ServeMetrics()
    holder = ModelHolder(resolver, metrics, settings.poll_s, settings.sd_micro_batch)
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
        return JSONResponse({"status": "ready", "model": model_hash(model)})

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/model", responses=unavailable)
    async def model_info() -> dict[str, Any]:
        """The served model, what its requests take (a label or a prompt), its default sampling settings and
        this server's request limits."""
        model = current_model(holder)
        spec = sample_spec(model, None, None, None, settings.sd_micro_batch)
        keys = {"max_n", "max_steps", "guidance_min", "guidance_max"}
        limits = settings.model_dump(include=keys) | {"max_seed": MAX_SEED}
        defaults = {"sampler": spec.sampler, "steps": spec.steps, "guidance": spec.guidance}
        if isinstance(model, LoadedPipeline):
            sd_keys = {"max_width", "max_height", "max_prompt_chars", "max_image_mib"}
            return {
                "model": model.hash,
                "kind": model.kind,
                "takes": "prompt",
                "class_names": None,
                "image_size": model.default_size,
                "channels": 3,
                "inpainting": model.parts.in_channels == 9,
                "samplers": list(sampler_names.SAMPLERS),
                "webui_samplers": {name: s.webui for name, s in sampler_names.SAMPLERS.items()},
                "defaults": defaults | {"width": model.default_size, "height": model.default_size, "clip_skip": 1},
                "limits": limits | settings.model_dump(include=sd_keys),
            }
        return {
            "model": model.meta.weights_hash,
            "kind": "pixel-class",
            "takes": "label",
            "class_names": model.meta.class_names,
            "image_size": model.meta.image_size,
            "channels": model.meta.channels,
            "samplers": samplers_for(model.scheduler_config),
            "defaults": defaults,
            "limits": limits,
        }

    async def generate(req: GenerateRequest) -> Any:
        """n images for a label (pixel-space class models) or a prompt (Stable Diffusion models), bitwise the
        ones `sdpipe generate` writes for the same settings and seeds."""
        model = current_model(holder)
        try:
            job = _job(model, req)
        except InvalidRequest as exc:
            return _invalid(exc.field, str(exc))
        result = await run_job(batcher, settings, job)
        if not isinstance(result, JobResult):
            return result
        images = [
            {"png_base64": im.png_base64, "seed": im.seed, "label": im.label, "prompt": im.prompt}
            for im in result.images
        ]
        return {"model": result.model, "images": images}

    def _job(model: AnyModel, req: GenerateRequest) -> GenerateJob:
        """The request as a job, checked against the served model (the worker checks again with the model that
        runs it: it may have been swapped meanwhile)."""
        pipeline = isinstance(model, LoadedPipeline)
        try:
            sampler = None if req.sampler is None else sampler_names.resolve(req.sampler)
        except ValueError as exc:
            raise InvalidRequest("sampler", str(exc)) from None
        if not pipeline:
            usable = samplers_for(model.scheduler_config)
            if sampler is not None and sampler not in usable:
                raise InvalidRequest(
                    "sampler", f"{req.sampler!r} does not apply to this model; use one of: {', '.join(usable)}"
                )
        job = GenerateJob(
            req.n,
            req.seed,
            req.label,
            req.steps,
            sampler,
            req.guidance,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            width=req.width,
            height=req.height,
            clip_skip=req.clip_skip,
            image=None if req.image is None else base64_bytes(req.image, "image"),
            mask=None if req.mask is None else base64_bytes(req.mask, "mask"),
            strength=req.strength,
        )
        if not isinstance(model, LoadedPipeline):
            given = sd_fields_given(job)
            if given:
                raise InvalidRequest(
                    given[0], "this model is a pixel-space class model: it takes a label, not prompts or sizes"
                )
            try:
                parse_labels(req.label, req.n, model.meta.class_names)
            except ValueError as exc:
                raise InvalidRequest("label", str(exc)) from None
            return job
        if "label" in req.model_fields_set:
            raise InvalidRequest("label", "a text-to-image model takes a prompt, not a label")
        spec = sample_spec(model, req.steps, sampler, req.guidance, settings.sd_micro_batch)
        check_size(model, job, sd_conditions(model, job, spec, keep=False), settings)
        return job

    generate.__annotations__["req"] = request_model(settings)  # this server's limits
    app.post(
        "/v1/generate", response_model=GenerateResponse, dependencies=[auth], responses=denied | busy | unavailable
    )(generate)

    webui_auth = Depends(_webui_auth_dependency(api_keys))
    sdapi.add_routes(app, holder, batcher, settings, webui_auth, denied | busy | unavailable)

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
