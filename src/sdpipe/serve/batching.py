"""Dynamic batching that never changes an image: concurrent requests share the network's micro-batches.

`sdpipe generate` runs the network on micro-batches of one fixed size m, with the image of seed s in row
`s % m` (see `sdpipe.sampling.generate`): a row's bits depend only on its own seed, conditioning (label, or
prompt, negative prompt, size, input image) and the sampler settings, never on the other rows. So images of
different requests can fill the free rows of one micro-batch, whatever their seeds, as long as each sits in
its own row `s % m` and the requests share sampler, steps and guidance (`generate_items` packs them, grouping
rows by `Conditioning.batch_key`). `run_jobs` runs a list of requests that way, for every model kind, and
encodes each image with the CLI's own `sampling.files.image_file`, so the PNG bytes are those `sdpipe generate`
writes. `Batcher` is the bounded queue and the one worker thread that merges what arrives within `max_wait_ms`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sdpipe import inputs
from sdpipe.conditioning import Conditioning, DataRef
from sdpipe.config import ConfigError
from sdpipe.models import LoadedModel
from sdpipe.models.pipelines import LoadedPipeline, PromptError
from sdpipe.sampling.files import image_file, label_conditioning, parse_labels, to_pixels
from sdpipe.sampling.generate import Row, SampleSpec, generate_items, model_sample_spec, pipeline_sample_spec
from sdpipe.serve.metrics import ServeMetrics
from sdpipe.serve.settings import ServeSettings

log = logging.getLogger("sdpipe.serve")

AnyModel = LoadedModel | LoadedPipeline
MAX_INPUT_PIXELS = 64 * 2**20  # an input image or mask (it is resized to the output size; this bounds the work)


def model_hash(model: AnyModel) -> str:
    """The content hash responses name a model by (`sha256:` and 16 hex digits), for every kind."""
    return model.hash if isinstance(model, LoadedPipeline) else model.meta.weights_hash


class InvalidRequest(ValueError):
    """A request the served model cannot honour; `field` names the request field (None: the request)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ServedImage:
    png_base64: str
    seed: int
    label: str | None
    prompt: str | None = None
    record: dict | None = None  # the samples.jsonl record `sdpipe generate` writes for it
    infotext: str | None = None  # the PNG's web-UI `parameters` text


@dataclass(frozen=True)
class JobResult:
    model: str  # weights hash of the model that made the images
    images: list[ServedImage]
    spec: SampleSpec | None = None  # the sampling settings they were made with


@dataclass
class GenerateJob:
    """One request: images with seeds seed..seed+n-1; options left None take the model's own defaults.

    A pixel-space class model takes `label`; a Stable Diffusion model takes `prompt` (required) and the rest,
    with `image`/`mask` the input image and mask as sent (PNG/JPEG/WebP bytes). `fields` maps these names to
    the request's own where they differ (the web-UI API's `init_images`, `denoising_strength`, ...), so a
    refusal names the field the client sent."""

    n: int
    seed: int = 0
    label: str = "all"
    steps: int | None = None
    sampler: str | None = None
    guidance: float | None = None
    future: Future[JobResult] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)
    prompt: str | None = None
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    clip_skip: int = 1
    image: bytes | None = None
    mask: bytes | None = None
    strength: float | None = None
    fields: dict[str, str] = field(default_factory=dict)

    def name_of(self, name: str) -> str:
        """The request's name for one of this job's fields."""
        return self.fields.get(name, name)

    def input_images(self) -> int:
        return (self.image is not None) + (self.mask is not None)


def sample_spec(
    model: AnyModel, steps: int | None, sampler: str | None, guidance: float | None, micro_batch: int | None = None
) -> SampleSpec:
    """The model's own sampling settings with a request's options, as `sdpipe generate` chooses them
    (`micro_batch`: a Stable Diffusion model's rows per network batch, as `--micro-batch`; None: its own)."""
    try:
        if isinstance(model, LoadedPipeline):
            return pipeline_sample_spec(micro_batch or model.micro_batch, steps, sampler, guidance)
        return model_sample_spec(model.meta.config, model.scheduler_config, steps, sampler, guidance)
    except ConfigError as exc:
        raise InvalidRequest(None, str(exc)) from None


_SD_FIELDS = ("prompt", "negative_prompt", "width", "height", "clip_skip", "image", "mask", "strength")


def sd_fields_given(job: GenerateJob) -> list[str]:
    """The text-to-image fields a job sets to anything but their defaults."""
    defaults = GenerateJob(n=1)
    return [name for name in _SD_FIELDS if getattr(job, name) != getattr(defaults, name)]


_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def image_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) of an input image, or InvalidRequest naming `what` if it is not one (or far too large)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
    except _IMAGE_ERRORS as exc:
        raise InvalidRequest(what, f"not an image sdpipe can read ({exc})") from None
    if size[0] * size[1] > MAX_INPUT_PIXELS:
        raise InvalidRequest(what, f"{size[0]}x{size[1]} pixels: input images may have at most {MAX_INPUT_PIXELS}")
    return size


def _data_ref(data: bytes, what: str, keep: bool) -> DataRef:
    """The `DataRef` of input bytes; with `keep`, the bytes are registered for the generation that follows
    (`sdpipe.inputs.register`), else only checked (the worker registers them just before it runs the job)."""
    image_size(data, what)
    try:
        if keep:
            return inputs.register(data, what=what)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except _IMAGE_ERRORS as exc:
        message = str(exc).removeprefix(f"{what}: ")
        raise InvalidRequest(what, message if keep else f"not an image sdpipe can read ({exc})") from None
    return DataRef(sha256=hashlib.sha256(data).hexdigest())


def sd_conditions(model: LoadedPipeline, job: GenerateJob, spec: SampleSpec, keep: bool = True) -> list[Conditioning]:
    """The conditioning of each of a job's images, as `sdpipe generate` builds it (`prompt_conditions`), or
    InvalidRequest naming the field: weighting syntax or a prompt past the text encoder's window, an input
    the model cannot take, a strength that keeps no step."""
    from sdpipe.sampling.sd_records import prompt_conditions

    if job.prompt is None:
        raise InvalidRequest(job.name_of("prompt"), f"{model.path.name} is a text-to-image model: give a prompt")
    if job.label != "all":
        raise InvalidRequest("label", "a text-to-image model takes a prompt, not a label")
    for name in ("prompt", "negative_prompt"):
        try:
            model.parts.check_prompt(getattr(job, name), name.replace("_", " "))
        except PromptError as exc:
            raise InvalidRequest(job.name_of(name), str(exc)) from None
    if job.mask is not None and job.image is None:
        raise InvalidRequest(job.name_of("mask"), "a mask needs an input image: it marks which part to repaint")
    if job.strength is not None and job.image is None:
        raise InvalidRequest(job.name_of("strength"), "the strength applies to an input image: send one")
    if model.parts.in_channels == 9 and job.mask is None:
        raise InvalidRequest(
            job.name_of("mask"), f"{model.path.name} is an inpainting model: send an input image and a mask"
        )
    width, height = job.width, job.height
    init = mask = None
    if job.image is not None:
        init = _data_ref(job.image, job.name_of("image"), keep)
        if width is None or height is None:  # the image's own size, rounded down as `sdpipe generate` does
            w, h = image_size(job.image, job.name_of("image"))
            width, height = width or max(8, w // 8 * 8), height or max(8, h // 8 * 8)
        strength = job.strength if job.strength is not None else (1.0 if job.mask is not None else 0.8)
        if int(spec.steps * strength) < 1:
            raise InvalidRequest(
                job.name_of("strength"),
                f"strength {strength} with {spec.steps} steps keeps no sampling step (steps x strength < 1)",
            )
    if job.mask is not None:
        mask = _data_ref(job.mask, job.name_of("mask"), keep)
    images = {"init": init, "mask": mask, "strength": job.strength} if init is not None else {}
    try:
        return prompt_conditions(
            model,
            [job.prompt],
            job.n,
            negative_prompt=job.negative_prompt,
            width=width,
            height=height,
            clip_skip=job.clip_skip,
            **images,  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise InvalidRequest(None, str(exc)) from None


def _job_rows(model: AnyModel, job: GenerateJob, spec: SampleSpec) -> list[Row]:
    if isinstance(model, LoadedPipeline):
        conds = sd_conditions(model, job, spec)
        return [Row(job.seed + i, conds[i]) for i in range(job.n)]
    given = sd_fields_given(job)
    if given:
        raise InvalidRequest(job.name_of(given[0]), "this model is a pixel-space class model: it takes a label")
    names = model.meta.class_names
    try:
        labels = parse_labels(job.label, job.n, names)
    except ValueError as exc:
        raise InvalidRequest("label", str(exc)) from None
    return [Row(job.seed + i, label_conditioning(names, None if labels is None else labels[i])) for i in range(job.n)]


def _chunks(jobs: list[GenerateJob]) -> Iterator[list[GenerateJob]]:
    """Jobs in runs whose input images all fit in `sdpipe.inputs`' cache at once (jobs without inputs: one
    run), so none is evicted before its micro-batch reads it. A chunk boundary changes no image."""
    chunk: list[GenerateJob] = []
    held = 0
    for job in jobs:
        if chunk and held + job.input_images() > inputs.MAX_CACHED // 2:
            yield chunk
            chunk, held = [], 0
        chunk.append(job)
        held += job.input_images()
    if chunk:
        yield chunk


def run_jobs(
    model: AnyModel, jobs: list[GenerateJob], metrics: ServeMetrics | None = None, micro_batch: int | None = None
) -> None:
    """Generate every job's images, sharing micro-batches between jobs with the same sampler settings
    (through `generate_items`, the CLI's own path), and complete each job's future (a job with a bad label,
    prompt or settings gets `InvalidRequest`). `micro_batch`: a Stable Diffusion model's rows per network batch."""
    groups: dict[SampleSpec, list[GenerateJob]] = {}
    for job in jobs:
        try:
            spec = sample_spec(model, job.steps, job.sampler, job.guidance, micro_batch)
            groups.setdefault(spec, []).append(job)
        except InvalidRequest as exc:
            job.future.set_exception(exc)
    for spec, group in groups.items():
        for chunk in _chunks(group):
            members = []
            for job in chunk:
                try:
                    members.append((job, _job_rows(model, job, spec)))
                except InvalidRequest as exc:
                    job.future.set_exception(exc)
            if members:
                _run_group(model, spec, members, metrics)


def _run_group(
    model: AnyModel, spec: SampleSpec, members: list[tuple[GenerateJob, list[Row]]], metrics: ServeMetrics | None
) -> None:
    try:
        rows = [row for _, job_rows in members for row in job_rows]
        images = generate_items(model.parts, rows, spec, on_batch=None if metrics is None else _counter(metrics))
        pngs = _encode(model, images, spec, metrics)
    except Exception as exc:  # a failed batch fails its requests, never the worker
        log.exception("batch of %d requests failed", len(members))
        for job, _ in members:
            job.future.set_exception(exc)
        return
    for job, job_rows in members:
        served = [
            ServedImage(
                pngs[row].png_base64, row.seed, row.cond.label, row.cond.prompt, pngs[row].record, pngs[row].infotext
            )
            for row in job_rows
        ]
        if metrics is not None:
            metrics.images.inc(len(served))
        job.future.set_result(JobResult(model_hash(model), served, spec))


def _counter(metrics: ServeMetrics) -> Callable[[dict[int, Row]], None]:
    def count(batch: dict[int, Row]) -> None:
        metrics.micro_batches.inc()
        metrics.rows_used.inc(len(batch))

    return count


@dataclass(frozen=True)
class _Encoded:
    png_base64: str
    record: dict
    infotext: str | None


def _encode(
    model: AnyModel, images: dict[Row, torch.Tensor], spec: SampleSpec, metrics: ServeMetrics | None
) -> dict[Row, _Encoded]:
    """Base64 PNGs with the generation parameters in their text chunks: `sampling.files.image_file`'s bytes,
    those `sdpipe generate` writes; non-finite and blank (one-value) images are counted."""
    out = {}
    for row, x in images.items():
        with np.errstate(invalid="ignore"):  # non-finite values are counted below, not warned about
            data, record = image_file(model, row, x, spec)
            if metrics is not None:
                if not bool(torch.isfinite(x).all()):
                    metrics.bad_images.labels("nonfinite").inc()
                elif (px := _pixels(model, x)).min() == px.max():
                    metrics.bad_images.labels("blank").inc()
        with Image.open(io.BytesIO(data)) as png:  # text chunks come before the pixels: nothing is decoded
            infotext = png.info.get("parameters")
        out[row] = _Encoded(base64.b64encode(data).decode(), record, infotext)
    return out


def _pixels(model: AnyModel, x: torch.Tensor) -> np.ndarray:
    if isinstance(model, LoadedPipeline):
        from sdpipe.sampling.sd_records import to_rgb8

        return to_rgb8(x)
    return to_pixels(x[None], model.meta.value_range)[0]


class QueueFull(Exception):
    """The bounded queue is full: the caller should answer 429 with `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Batcher:
    """A bounded request queue and one worker thread that runs what arrives within `max_wait_ms` of the
    first waiting request together (up to `max_batch` images), on the model `current_model()` gives at
    the start of each batch (so a model swap happens between batches, never inside one)."""

    def __init__(
        self, settings: ServeSettings, current_model: Callable[[], AnyModel | None], metrics: ServeMetrics
    ) -> None:
        self.settings = settings
        self._current_model = current_model
        self._metrics = metrics
        self._queue: queue.Queue[GenerateJob] = queue.Queue(maxsize=settings.queue_size)
        self._carry: deque[GenerateJob] = deque()  # taken from the queue but left for the next batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdpipe-batcher", daemon=True)
        self._seconds_per_request = 0.0  # moving average of batch time per request (admission, Retry-After)
        metrics.queue_depth.set_function(self.depth)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the batch in progress, then fail whatever still waits (the server is going away)."""
        self._stop.set()
        self._thread.join(timeout_s)
        leftover = list(self._carry)
        while True:
            try:
                leftover.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in leftover:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    def depth(self) -> int:
        return self._queue.qsize() + len(self._carry)

    def submit(self, job: GenerateJob) -> None:
        """Queue a job or raise `QueueFull`: when the queue is full, or when the jobs already waiting would
        take longer than the request timeout (so overload is answered with 429s, not with timeouts)."""
        wait = self.depth() * self._seconds_per_request
        try:
            if wait > self.settings.timeout_s:
                raise queue.Full
            self._queue.put_nowait(job)
        except queue.Full:
            self._metrics.rejected.inc()
            raise QueueFull(max(1, round(wait + 0.5))) from None

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._collect()
            try:
                self._run_batch(jobs)
            except Exception as exc:  # never let one batch stop the worker
                log.exception("batch failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _collect(self) -> list[GenerateJob]:
        """The next batch: the first waiting job, plus what arrives within max_wait_ms, up to max_batch images."""
        try:
            first = self._carry.popleft() if self._carry else self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        jobs, images = [first], first.n
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while images < self.settings.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if images + job.n > self.settings.max_batch:
                self._carry.append(job)
                break
            jobs.append(job)
            images += job.n
        return jobs

    def _run_batch(self, jobs: list[GenerateJob]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # timed-out ones are dropped
        if not live:
            return
        model = self._current_model()
        if model is None:
            for job in live:
                job.future.set_exception(RuntimeError("no model loaded"))
            return
        t0 = time.perf_counter()
        run_jobs(model, live, self._metrics, self.settings.sd_micro_batch)
        seconds = time.perf_counter() - t0
        self._metrics.batch_seconds.observe(seconds)
        self._metrics.batch_requests.observe(len(live))
        self._metrics.batch_images.observe(sum(j.n for j in live))
        weight = 0.2 if self._seconds_per_request else 1.0
        self._seconds_per_request += weight * (seconds / len(live) - self._seconds_per_request)
