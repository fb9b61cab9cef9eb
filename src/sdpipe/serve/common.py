"""What the two generation APIs (`/v1/generate` and the web-UI API `/sdapi/v1/*`) share: 422 bodies naming
fields, base64 inputs, and handing a job to the batcher and waiting for it (429 when the queue is full, 503
on a timeout or while no model is loaded)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Sequence

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from sdpipe.serve.batching import AnyModel, Batcher, GenerateJob, InvalidRequest, JobResult, QueueFull
from sdpipe.serve.holder import ModelHolder
from sdpipe.serve.settings import ServeSettings

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def invalid(field: str | None, message: str) -> JSONResponse:
    """422 naming one field (dots in `field` are nested names: `override_settings.sd_vae`)."""
    return invalid_many([(field, message)])


def invalid_many(problems: Sequence[tuple[str | None, str]]) -> JSONResponse:
    """422 in FastAPI's own shape, one entry per (field, message)."""
    detail = [
        {"loc": ["body", *field.split(".")] if field else ["body"], "msg": message, "type": "value_error"}
        for field, message in problems
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def base64_bytes(value: str, field: str) -> bytes:
    """The bytes of a base64 field, with or without a `data:image/...;base64,` prefix (web-UI clients send
    both); InvalidRequest naming the field otherwise."""
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, "not base64 (an image's bytes, optionally as a data: URL)") from None
    if not data:
        raise InvalidRequest(field, "empty: send an image's bytes, base64")
    return data


def base64_limit(max_mib: float) -> int:
    """The longest base64 text (with a data: URL prefix) of an input of at most `max_mib` MiB."""
    return int(max_mib * 2**20 + 2) // 3 * 4 + 64


def current_model(holder: ModelHolder) -> AnyModel:
    model = holder.current
    if model is None:
        raise HTTPException(503, "the model is still loading; retry shortly", {"Retry-After": "5"})
    return model


async def run_job(batcher: Batcher, settings: ServeSettings, job: GenerateJob) -> JobResult | JSONResponse:
    """Queue a job and wait for its images: the result, or a 422 naming the field the model refused (it may
    have been swapped meanwhile); HTTPException 429 (queue full, Retry-After), 503 (timeout, shutting down)."""
    try:
        batcher.submit(job)
    except QueueFull as full:
        raise HTTPException(429, str(full), {"Retry-After": str(full.retry_after_s)}) from None
    try:
        return await asyncio.wait_for(asyncio.wrap_future(job.future), settings.timeout_s)
    except asyncio.TimeoutError:
        msg = f"not answered within {settings.timeout_s:g} s (server busy); retry later"
        raise HTTPException(503, msg, {"Retry-After": "1"}) from None
    except InvalidRequest as exc:  # e.g. a label the model swapped in meanwhile does not have
        return invalid(exc.field, str(exc))
    except RuntimeError as exc:  # shutting down
        raise HTTPException(503, str(exc)) from None
