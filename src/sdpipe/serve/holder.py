"""The model being served, and where it comes from.

A resolver says which model should be served now: a fixed path, or a registry reference such as
`digits@production` resolved again on each call, as a `ModelSource` that loads the exact version it names with
the check of its weights against the hash recorded at registration. `ModelHolder` asks it every
`poll_s` seconds (and on `POST /admin/reload`); when the answer is another directory or other weights, it
loads the new model and runs a warm-up generation off to the side, then replaces the served model in one
reference assignment. The batch worker reads the model once per batch, so a batch in flight finishes on the
model it started with and no request fails because of a swap; a model that fails to load or to warm up is
never served (the old one stays).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdpipe.models import LoadedModel, ModelMeta, load_model
from sdpipe.sampling.files import label_conditioning
from sdpipe.sampling.generate import Row, generate_items
from sdpipe.serve.batching import sample_spec
from sdpipe.serve.metrics import ServeMetrics

log = logging.getLogger("sdpipe.serve")


@dataclass(frozen=True)
class ModelSource:
    """A model directory and how to load it (for a registry version: with its weights-hash check)."""

    path: Path
    load: Callable[[], LoadedModel] = field(compare=False, repr=False)


Resolver = Callable[[], Path | ModelSource]


def model_resolver(ref: str, registry_url: str | None = None) -> Resolver:
    """A model directory, or a registry reference (`NAME@ALIAS`, `NAME:VERSION`) resolved again on every
    call (so moving an alias changes the answer); see `sdpipe.registry.locate` and `sdpipe.registry.load`."""
    from sdpipe.registry import load, locate

    def resolve_now() -> Path | ModelSource:
        path, version = locate(ref, registry_url)
        if version is None:
            return path
        return ModelSource(path, functools.partial(load, version, registry_url))

    return resolve_now


def as_source(found: Path | ModelSource) -> ModelSource:
    """What a resolver returned, as a `ModelSource` (a plain directory loads with `load_model`)."""
    if isinstance(found, ModelSource):
        return found
    return ModelSource(Path(found), functools.partial(load_model, found))


@dataclass(frozen=True)
class ModelIdentity:
    path: Path
    weights_hash: str


def identify(path: Path) -> ModelIdentity:
    """Which model a directory holds, from its small `sdpipe.json` (the weights are not read)."""
    meta_file = Path(path) / "sdpipe.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not an sdpipe model: sdpipe.json is missing")
    meta = ModelMeta.model_validate_json(meta_file.read_text())
    return ModelIdentity(Path(path).resolve(), meta.weights_hash)


def warm_up(model: LoadedModel) -> None:
    """One generation with the model's own settings; raises if it fails or gives non-finite values."""
    spec = sample_spec(model, None, None, None)
    names = model.meta.class_names
    row = Row(0, label_conditioning(names, 0 if names is not None else None))
    x = generate_items(model.parts, [row], spec)[row]
    if not torch.isfinite(x).all():
        raise ValueError(f"warm-up generation of {model.path} gave non-finite values")


class ModelHolder:
    """Holds the served model; `refresh()` swaps in whatever the resolver names now, once it has warmed up."""

    def __init__(self, resolver: Resolver, metrics: ServeMetrics, poll_s: float) -> None:
        self._resolver = resolver
        self._metrics = metrics
        self._poll_s = poll_s
        self._lock = threading.Lock()  # one load at a time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="sdpipe-model-poll", daemon=True)
        self.current: LoadedModel | None = None  # read by the worker once per batch
        self.identity: ModelIdentity | None = None
        self.error: str | None = None  # why the last load failed
        self._failed: ModelIdentity | None = None

    @property
    def ready(self) -> bool:
        return self.current is not None

    def start(self) -> None:
        """Load the first model and poll the resolver, in a background thread (the server answers meanwhile)."""
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def refresh(self, retry_failed: bool = True) -> bool:
        """Resolve the reference; load, warm up and swap in the model if it changed. True if it did.
        Errors propagate (the served model stays as it was); with `retry_failed` False, a model that
        already failed to load is not tried again until the reference changes."""
        with self._lock:
            source = as_source(self._resolver())
            identity = identify(source.path)
            if identity == self.identity or (identity == self._failed and not retry_failed):
                return False
            log.info("loading model %s (%s)", identity.path, identity.weights_hash)
            try:
                model = source.load()
                if model.meta.weights_hash != identity.weights_hash:
                    raise ValueError(f"{identity.path} changed while it was loaded")
                warm_up(model)
            except Exception:
                self._failed = identity
                raise
            first = self.current is None
            self.current, self.identity, self.error = model, identity, None  # the swap
            self._metrics.set_model(identity.weights_hash)
            self._metrics.ready.set(1)
            if not first:
                self._metrics.reloads.labels("ok").inc()
            log.info("serving model %s (%s)", identity.path, identity.weights_hash)
            return True

    def _poll(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                self.refresh(retry_failed=False)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if error != self.error:  # say it once, not every poll
                    log.warning("model reference not loaded (%s); serving %s", error, self.identity)
                    if self.current is not None:
                        self._metrics.reloads.labels("failed").inc()
                self.error = error
            wait = self._poll_s
