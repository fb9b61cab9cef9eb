"""The model being served, and where it comes from.

A resolver says which model should be served now: a fixed path, or a registry reference such as
`digits@production` resolved again on each call, as a `ModelSource` that loads the exact version it names with
the check of its weights against the hash recorded at registration. A path may hold any kind of model
`sdpipe.models.kinds.load_any` loads: an sdpipe pixel-space model folder, a diffusers Stable Diffusion folder or
one web-UI `.safetensors` checkpoint. `ModelHolder` asks the resolver every `poll_s` seconds (and on
`POST /admin/reload`); when the answer is another path or other weights, it loads the new model and runs a
warm-up generation off to the side, then replaces the served model in one reference assignment. The batch
worker reads the model once per batch, so a batch in flight finishes on the model it started with and no
request fails because of a swap; a model that fails to load or to warm up is never served (the old one stays).
"""

from __future__ import annotations

import functools
import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from sdpipe.conditioning import Conditioning
from sdpipe.models import LoadedModel, ModelMeta, load_model
from sdpipe.models.pipelines import LoadedPipeline
from sdpipe.sampling.files import label_conditioning
from sdpipe.sampling.generate import Row, generate_items, pipeline_sample_spec
from sdpipe.serve.batching import AnyModel, model_hash, sample_spec
from sdpipe.serve.metrics import ServeMetrics

log = logging.getLogger("sdpipe.serve")
WARM_UP_STEPS = 2  # a Stable Diffusion warm-up only has to show the model runs and gives finite values


@dataclass(frozen=True)
class ModelSource:
    """A model path and how to load it (for a registry version: with its weights-hash check)."""

    path: Path
    load: Callable[[], AnyModel] = field(compare=False, repr=False)


Resolver = Callable[[], Path | ModelSource]


def is_pipeline_path(path: Path) -> bool:
    """A web-UI checkpoint file or a diffusers folder (never a registry reference)."""
    return path.is_file() or (path / "model_index.json").is_file()


def load_path(path: Path, device: str = "cpu", dtype: str = "float32", config: str | None = None) -> AnyModel:
    """The model at `path`: an sdpipe pixel-space folder as `sdpipe generate` loads it, anything else through
    `load_any` (which refuses what it cannot load, naming what the path holds)."""
    path = Path(path)
    if (path / "sdpipe.json").is_file() and not (path / "model_index.json").is_file():
        return _on_device(load_model(path), device, dtype)
    from sdpipe.models.kinds import load_any

    return load_any(path, device, dtype, config)


def _on_device(model: LoadedModel, device: str, dtype: str) -> LoadedModel:
    if dtype != "float32":
        raise ValueError(f"--dtype {dtype}: sdpipe's pixel-space models sample in float32")
    if device != "cpu":
        torch.nn.Module.to(model.unet, torch.device(device))
    return model


def _load_version(
    version: str, registry_url: str | None, device: str, dtype: str, config: str | None = None
) -> AnyModel:
    """A registry version, checked against its registration, on `device` in `dtype`."""
    from sdpipe.registry import load

    if (device, dtype, config) == ("cpu", "float32", None):
        model = load(version, registry_url)
    else:
        model = load(version, registry_url, device=device, dtype=dtype, config=config)  # type: ignore[call-arg,unused-ignore]
    return _on_device(model, device, dtype) if isinstance(model, LoadedModel) else model


def model_resolver(
    ref: str, registry_url: str | None = None, device: str = "cpu", dtype: str = "float32", config: str | None = None
) -> Resolver:
    """A model path (an sdpipe model folder, a diffusers folder, a `.safetensors` checkpoint), or a registry
    reference (`NAME@ALIAS`, `NAME:VERSION`) resolved again on every call (so moving an alias changes the
    answer); see `sdpipe.registry.locate` and `sdpipe.registry.load`."""
    from sdpipe.registry import locate

    def resolve_now() -> Path | ModelSource:
        if is_pipeline_path(Path(ref)):
            return ModelSource(Path(ref), functools.partial(load_path, Path(ref), device, dtype, config))
        path, version = locate(ref, registry_url)
        if version is None:
            return ModelSource(path, functools.partial(load_path, path, device, dtype, config))
        return ModelSource(path, functools.partial(_load_version, version, registry_url, device, dtype, config))

    return resolve_now


def as_source(found: Path | ModelSource) -> ModelSource:
    """What a resolver returned, as a `ModelSource` (a plain path loads with `load_path` on the CPU)."""
    if isinstance(found, ModelSource):
        return found
    return ModelSource(Path(found), functools.partial(load_path, Path(found)))


@dataclass(frozen=True)
class ModelIdentity:
    path: Path
    weights_hash: str  # what responses name the model by: `model_hash` of the loaded model
    sha256: str | None = None  # the full content hash, where sdpipe computes one (Stable Diffusion models)


def identify(path: Path) -> ModelIdentity:
    """Which model a path holds, without loading it: a pixel-space model from its small `sdpipe.json`; a
    Stable Diffusion folder or file from the (cached, streamed) hashes of its files, as the loader computes them."""
    path = Path(path)
    meta_file = path / "sdpipe.json"
    if meta_file.is_file() and not (path / "model_index.json").is_file():
        meta = ModelMeta.model_validate_json(meta_file.read_text())
        return ModelIdentity(path.resolve(), meta.weights_hash)
    if not is_pipeline_path(path):
        raise FileNotFoundError(f"{path} is not an sdpipe model: sdpipe.json is missing")
    from sdpipe.models import files
    from sdpipe.models.pipelines import pipeline_sha256

    files.identify(path, with_hash=False)  # refuses pickles, LoRAs, VAEs, truncated files by name, unhashed
    sha = pipeline_sha256(path)  # the hash `load_any` gives the model
    return ModelIdentity(path.resolve(), "sha256:" + sha[:16], sha)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def warm_up(model: AnyModel, micro_batch: int | None = None) -> None:
    """One generation through `generate_items`: the model's own settings for a pixel-space model; for a Stable
    Diffusion model an empty prompt at its native size with its default sampler for `WARM_UP_STEPS` steps (an
    inpainting model gets a grey image and a full mask). Raises if it fails or gives non-finite values."""
    if isinstance(model, LoadedPipeline):
        spec = pipeline_sample_spec(micro_batch or model.micro_batch, WARM_UP_STEPS, None, None)
        cond = Conditioning(prompt="")
        if model.parts.in_channels == 9:
            from sdpipe.inputs import register

            size = (model.default_size, model.default_size)
            init = register(_png(Image.new("RGB", size, (128, 128, 128))))
            cond = Conditioning(prompt="", init=init, mask=register(_png(Image.new("L", size, 255))), strength=1.0)
    else:
        spec = sample_spec(model, None, None, None)
        names = model.meta.class_names
        cond = label_conditioning(names, 0 if names is not None else None)
    row = Row(0, cond)
    x = generate_items(model.parts, [row], spec)[row]
    if not torch.isfinite(x).all():
        raise ValueError(f"warm-up generation of {model.path} gave non-finite values")


class ModelHolder:
    """Holds the served model; `refresh()` swaps in whatever the resolver names now, once it has warmed up."""

    def __init__(
        self, resolver: Resolver, metrics: ServeMetrics, poll_s: float, micro_batch: int | None = None
    ) -> None:
        self._resolver = resolver
        self._metrics = metrics
        self._poll_s = poll_s
        self._micro_batch = micro_batch  # a Stable Diffusion model's rows per network batch (None: its own)
        self._lock = threading.Lock()  # one load at a time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="sdpipe-model-poll", daemon=True)
        self.current: AnyModel | None = None  # read by the worker once per batch
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
                if model_hash(model) != identity.weights_hash:
                    raise ValueError(f"{identity.path} changed while it was loaded")
                warm_up(model, self._micro_batch)
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
