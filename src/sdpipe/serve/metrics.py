"""Prometheus metrics of one server, in a registry of its own (so tests can run several servers at once)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# the paths counted by name; anything else is counted as "other" (keeps label values bounded)
KNOWN_PATHS = frozenset(
    {"/", "/healthz", "/readyz", "/metrics", "/v1/model", "/v1/generate", "/admin/reload"}
    | {
        f"/sdapi/v1/{name}"
        for name in ("txt2img", "img2img", "samplers", "schedulers", "sd-models", "options", "scripts", "progress")
    }
)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "sdpipe_http_requests", "HTTP requests by path and status code", ["path", "status"], registry=r
        )
        self.latency = Histogram(
            "sdpipe_http_request_seconds",
            "Time from request to response, by path",
            ["path"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        self.batch_images = Histogram(
            "sdpipe_batch_images", "Images per batch run by the worker", buckets=sizes, registry=r
        )
        self.batch_requests = Histogram(
            "sdpipe_batch_requests", "Requests merged into one batch", buckets=sizes, registry=r
        )
        self.batch_seconds = Histogram("sdpipe_batch_seconds", "Time to run one batch", registry=r)
        self.micro_batches = Counter("sdpipe_micro_batches", "Network runs (fixed-size micro-batches)", registry=r)
        self.rows_used = Counter("sdpipe_micro_batch_rows_used", "Micro-batch rows holding an image", registry=r)
        self.queue_depth = Gauge("sdpipe_queue_depth", "Requests waiting for the worker", registry=r)
        self.rejected = Counter("sdpipe_rejected", "Requests refused because the queue was full (429)", registry=r)
        self.images = Counter("sdpipe_images_generated", "Images generated for requests", registry=r)
        self.bad_images = Counter(
            "sdpipe_bad_images", "Returned images that were non-finite or blank (one value)", ["kind"], registry=r
        )
        self.reloads = Counter("sdpipe_model_reloads", "Model loads after the first, by result", ["result"], registry=r)
        self.ready = Gauge("sdpipe_ready", "1 once a model is loaded and warmed up", registry=r)
        self.model_info = Gauge("sdpipe_model_info", "The model being served (value 1)", ["weights_hash"], registry=r)
        for kind in ("nonfinite", "blank"):
            self.bad_images.labels(kind)
        for result in ("ok", "failed"):
            self.reloads.labels(result)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        name = path if path in KNOWN_PATHS else "other"
        self.requests.labels(name, str(status)).inc()
        self.latency.labels(name).observe(seconds)

    def set_model(self, weights_hash: str) -> None:
        self.model_info.clear()
        self.model_info.labels(weights_hash).set(1)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
