"""Dynamic batching that never changes an image: concurrent requests share the network's micro-batches.

`sdpipe generate` runs the network on micro-batches of one fixed size m, with the image of seed s in row
`s % m` (see `sdpipe.sampling.generate`): a row's bits depend only on its own seed, label and the sampler
settings, never on the other rows. So images of different requests can fill the free rows of one
micro-batch, whatever their seeds, as long as each sits in its own row `s % m` and the requests share
sampler, steps and guidance. `pack_rows` does that packing; `run_jobs` runs a list of requests that way.
`Batcher` is the bounded queue and the one worker thread that merges what arrives within `max_wait_ms`.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from sdpipe.config import ConfigError
from sdpipe.models import LoadedModel
from sdpipe.sampling.files import encode_png, parse_labels, png_info, sample_record, to_pixels
from sdpipe.sampling.generate import SampleSpec, denoise, model_sample_spec, row_inputs
from sdpipe.serve.metrics import ServeMetrics
from sdpipe.serve.settings import ServeSettings

log = logging.getLogger("sdpipe.serve")

Item = tuple[int, int | None]  # (seed, label index); one image


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


@dataclass(frozen=True)
class JobResult:
    model: str  # weights hash of the model that made the images
    images: list[ServedImage]


@dataclass
class GenerateJob:
    """One request: images with seeds seed..seed+n-1; options left None take the model's own defaults."""

    n: int
    seed: int = 0
    label: str = "all"
    steps: int | None = None
    sampler: str | None = None
    guidance: float | None = None
    future: Future[JobResult] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


def sample_spec(model: LoadedModel, steps: int | None, sampler: str | None, guidance: float | None) -> SampleSpec:
    """The model's own sampling settings with a request's options, as `sdpipe generate` chooses them."""
    try:
        return model_sample_spec(model.meta.config, model.scheduler_config, steps, sampler, guidance)
    except ConfigError as exc:
        raise InvalidRequest(None, str(exc)) from None


def pack_rows(items: list[Item], micro_batch: int) -> list[dict[int, Item]]:
    """Distinct images into as few micro-batches as first-fit finds: each maps row `seed % m` -> image."""
    batches: list[dict[int, Item]] = []
    for item in items:
        row = item[0] % micro_batch
        free = next((b for b in batches if row not in b), None)
        if free is None:
            batches.append({row: item})
        else:
            free[row] = item
    return batches


def run_rows(model: LoadedModel, rows: dict[int, Item], spec: SampleSpec) -> torch.Tensor:
    """One micro-batch, exactly as `sampling.generate.generate` draws it: row r holds the image of the seed
    in `rows[r]` (noise and sampler noise from its own generator); other rows are padding."""
    meta = model.meta
    noise, labels, gens = row_inputs(
        rows,
        spec.micro_batch,
        (meta.channels, meta.image_size, meta.image_size),
        meta.null_label,
        meta.class_names is not None,
        next(model.unet.parameters()).device,
    )
    return denoise(model.unet, model.scheduler_config, noise, labels, meta.null_label, spec, gens)


def generate_items(
    model: LoadedModel, items: list[Item], spec: SampleSpec, metrics: ServeMetrics | None = None
) -> dict[Item, torch.Tensor]:
    """Each distinct image once, in packed micro-batches: image -> tensor in [-1, 1] (C, H, W)."""
    out: dict[Item, torch.Tensor] = {}
    for rows in pack_rows(list(dict.fromkeys(items)), spec.micro_batch):
        if metrics is not None:
            metrics.micro_batches.inc()
            metrics.rows_used.inc(len(rows))
        x = run_rows(model, rows, spec).cpu()
        for r, item in rows.items():
            out[item] = x[r]
    return out


def _job_items(model: LoadedModel, job: GenerateJob) -> list[Item]:
    try:
        labels = parse_labels(job.label, job.n, model.meta.class_names)
    except ValueError as exc:
        raise InvalidRequest("label", str(exc)) from None
    return [(job.seed + i, None if labels is None else labels[i]) for i in range(job.n)]


def run_jobs(model: LoadedModel, jobs: list[GenerateJob], metrics: ServeMetrics | None = None) -> None:
    """Generate every job's images, sharing micro-batches between jobs with the same sampler settings,
    and complete each job's future (a job with a bad label or settings gets `InvalidRequest`)."""
    groups: dict[SampleSpec, list[tuple[GenerateJob, list[Item]]]] = {}
    for job in jobs:
        try:
            spec = sample_spec(model, job.steps, job.sampler, job.guidance)
            groups.setdefault(spec, []).append((job, _job_items(model, job)))
        except InvalidRequest as exc:
            job.future.set_exception(exc)
    for spec, members in groups.items():
        try:
            images = generate_items(model, [it for _, items in members for it in items], spec, metrics)
            pngs = _encode(model, images, spec, metrics)
        except Exception as exc:  # a failed batch fails its requests, never the worker
            log.exception("batch of %d requests failed", len(members))
            for job, _ in members:
                job.future.set_exception(exc)
            continue
        for job, items in members:
            served = [ServedImage(pngs[it], it[0], _label_name(model, it[1])) for it in items]
            if metrics is not None:
                metrics.images.inc(len(served))
            job.future.set_result(JobResult(model.meta.weights_hash, served))


def _label_name(model: LoadedModel, label: int | None) -> str | None:
    names = model.meta.class_names
    return None if label is None or names is None else names[label]


def _encode(
    model: LoadedModel, images: dict[Item, torch.Tensor], spec: SampleSpec, metrics: ServeMetrics | None
) -> dict[Item, str]:
    """Base64 PNGs with the generation parameters in their text chunks, as `sdpipe generate` writes them."""
    items = list(images)
    x = torch.stack([images[it] for it in items])
    finite = torch.isfinite(x).flatten(1).all(dim=1).tolist()
    out = {}
    with np.errstate(invalid="ignore"):  # non-finite values are counted below, not warned about
        pixels = to_pixels(x, model.meta.value_range)
    for item, px, ok in zip(items, pixels, finite, strict=True):
        if metrics is not None and not ok:
            metrics.bad_images.labels("nonfinite").inc()
        elif metrics is not None and px.min() == px.max():
            metrics.bad_images.labels("blank").inc()
        record = sample_record(model, item[1], item[0], spec)
        out[item] = base64.b64encode(encode_png(np.ascontiguousarray(px), png_info(record, model, spec))).decode()
    return out


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
        self, settings: ServeSettings, current_model: Callable[[], LoadedModel | None], metrics: ServeMetrics
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
        run_jobs(model, live, self._metrics)
        seconds = time.perf_counter() - t0
        self._metrics.batch_seconds.observe(seconds)
        self._metrics.batch_requests.observe(len(live))
        self._metrics.batch_images.observe(sum(j.n for j in live))
        weight = 0.2 if self._seconds_per_request else 1.0
        self._seconds_per_request += weight * (seconds / len(live) - self._seconds_per_request)
