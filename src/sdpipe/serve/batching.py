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
from sdpipe.sampling.files import encode_png, label_conditioning, parse_labels, png_info, sample_record, to_pixels
from sdpipe.sampling.generate import Row, SampleSpec, generate_items, model_sample_spec
from sdpipe.serve.metrics import ServeMetrics
from sdpipe.serve.settings import ServeSettings

log = logging.getLogger("sdpipe.serve")


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


def _job_rows(model: LoadedModel, job: GenerateJob) -> list[Row]:
    names = model.meta.class_names
    try:
        labels = parse_labels(job.label, job.n, names)
    except ValueError as exc:
        raise InvalidRequest("label", str(exc)) from None
    return [Row(job.seed + i, label_conditioning(names, None if labels is None else labels[i])) for i in range(job.n)]


def run_jobs(model: LoadedModel, jobs: list[GenerateJob], metrics: ServeMetrics | None = None) -> None:
    """Generate every job's images, sharing micro-batches between jobs with the same sampler settings
    (through `generate_items`, the CLI's own path), and complete each job's future (a job with a bad label or
    settings gets `InvalidRequest`)."""
    groups: dict[SampleSpec, list[tuple[GenerateJob, list[Row]]]] = {}
    for job in jobs:
        try:
            spec = sample_spec(model, job.steps, job.sampler, job.guidance)
            groups.setdefault(spec, []).append((job, _job_rows(model, job)))
        except InvalidRequest as exc:
            job.future.set_exception(exc)
    for spec, members in groups.items():
        try:
            rows = [row for _, job_rows in members for row in job_rows]
            images = generate_items(model.parts, rows, spec, on_batch=None if metrics is None else _counter(metrics))
            pngs = _encode(model, images, spec, metrics)
        except Exception as exc:  # a failed batch fails its requests, never the worker
            log.exception("batch of %d requests failed", len(members))
            for job, _ in members:
                job.future.set_exception(exc)
            continue
        for job, job_rows in members:
            served = [ServedImage(pngs[row], row.seed, row.cond.label) for row in job_rows]
            if metrics is not None:
                metrics.images.inc(len(served))
            job.future.set_result(JobResult(model.meta.weights_hash, served))


def _counter(metrics: ServeMetrics) -> Callable[[dict[int, Row]], None]:
    def count(batch: dict[int, Row]) -> None:
        metrics.micro_batches.inc()
        metrics.rows_used.inc(len(batch))

    return count


def _encode(
    model: LoadedModel, images: dict[Row, torch.Tensor], spec: SampleSpec, metrics: ServeMetrics | None
) -> dict[Row, str]:
    """Base64 PNGs with the generation parameters in their text chunks, as `sdpipe generate` writes them."""
    rows = list(images)
    x = torch.stack([images[row] for row in rows])
    finite = torch.isfinite(x).flatten(1).all(dim=1).tolist()
    names = model.meta.class_names
    out = {}
    with np.errstate(invalid="ignore"):  # non-finite values are counted below, not warned about
        pixels = to_pixels(x, model.meta.value_range)
    for row, px, ok in zip(rows, pixels, finite, strict=True):
        if metrics is not None and not ok:
            metrics.bad_images.labels("nonfinite").inc()
        elif metrics is not None and px.min() == px.max():
            metrics.bad_images.labels("blank").inc()
        label = None if row.cond.label is None or names is None else names.index(row.cond.label)
        record = sample_record(model, label, row.seed, spec)
        out[row] = base64.b64encode(encode_png(np.ascontiguousarray(px), png_info(record, model, spec))).decode()
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
