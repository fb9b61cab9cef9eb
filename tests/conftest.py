"""Shared fixtures: a tiny config and a tiny trained model (random-ish weights, seconds to make)."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_fixtures import (  # noqa: F401  (the tiny Stable Diffusion fixtures, for every test module)
    offline,
    sd1_inpaint_pipeline,
    sd1_pipeline,
    sd1_single_file,
    sd2v_pipeline,
    sd2v_single_file,
    sdxl_inpaint_pipeline,
    sdxl_pipeline,
    sdxl_single_file,
)
from sdpipe.config import PipelineConfig, load_config
from sdpipe.models import ModelMeta, build_unet, save_model, weights_hash
from sdpipe.models.format import library_versions
from sdpipe.sampling import make_scheduler
from sdpipe.train import sampler_config

TINY = [
    # the ddpm formulation, so tests can use every sampler (an EDM model samples with euler/dpmpp_2m only)
    "diffusion.formulation=ddpm",
    "train.loss_weighting=uniform",
    "model.block_out_channels=[16, 32]",
    "model.norm_num_groups=8",
    "model.attention_head_dim=8",
    "train.steps=6",
    "train.batch_size=32",
    "train.warmup_steps=2",
    "train.checkpoint_every=3",
    "sample.steps=4",
    "sample.micro_batch=8",
    "evaluate.n_samples=40",
    "evaluate.guidance_scales=[1.0, 2.0]",
]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module of tiny models: a second thread only contends (and costs minutes on a busy
    2-core machine)."""
    from sd_fixtures import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session", autouse=True)
def _private_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches (the evaluation feature network) and the default registry live in a temporary folder, never
    in the user's home; tests that need their own set the variables again."""
    os.environ["SDPIPE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["SDPIPE_HOME"] = str(tmp_path_factory.mktemp("home"))
    os.environ.pop("SDPIPE_REGISTRY_URL", None)


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process's umask set to each of two usual values for one test, then restored."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list:
    """The uvicorn servers `sdpipe serve` ran, which do not listen: their run only records them (and closes
    their sockets), so a test of the command returns as soon as it would serve."""
    import uvicorn

    servers: list[uvicorn.Server] = []

    def run(self: uvicorn.Server, sockets: list | None = None) -> None:
        servers.append(self)
        self.started = True
        for sock in sockets or []:
            sock.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    return servers


@pytest.fixture(scope="session")
def tiny_config() -> PipelineConfig:
    return load_config(None, TINY)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_config: PipelineConfig) -> Path:
    from sdpipe.pipeline import train_model

    run = tmp_path_factory.mktemp("tiny_run")
    return train_model(tiny_config, run, show_progress=False).model.path


def random_model(
    path: Path,
    seed: int = 0,
    *,
    sets: list[str] | None = None,
    scale: float = 1.0,
    versions: dict[str, str] | None = None,
    dataset_id: str = "random",
) -> Path:
    """A tiny class-conditional digits model with random weights (seed; multiplied by `scale`), saved in the
    sdpipe format with the config `sets` give: for tests that need a model, not a trained one."""
    cfg = load_config(None, sets or TINY)
    torch.manual_seed(seed)
    unet = build_unet(cfg.model, sample_size=8, channels=1, num_classes=10)
    if scale != 1.0:
        with torch.no_grad():
            for p in unet.parameters():
                p.mul_(scale)
    meta = ModelMeta(
        class_names=[str(i) for i in range(10)],
        null_label=10,
        image_size=8,
        channels=1,
        value_range=(0.0, 16.0),
        dataset_id=dataset_id,
        weights_hash=weights_hash(unet),
        config=cfg.model_dump(mode="json"),
        versions=library_versions() | (versions or {}),
    )
    return save_model(path, unet, make_scheduler(cfg.sample.sampler, sampler_config(cfg)), meta)


def noise_image(seed: int, shape: tuple[int, ...] = (12, 16, 3)) -> np.ndarray:
    """Random uint8 pixels: a distinct image per seed."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def race_registry_versions(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Barrier, set[int]]:
    """Make two registering threads both read the latest version number before either inserts the next: the
    registry's clock, called between the two, waits for both. Returns the barrier and the threads that waited,
    so a test can check that the race really happened."""
    from sdpipe.registry import core

    both_read, waited, real_now = threading.Barrier(2), set(), core.now

    def now_after_both_read() -> str:
        if threading.get_ident() not in waited:
            waited.add(threading.get_ident())
            both_read.wait(timeout=20)
        return real_now()

    monkeypatch.setattr(core, "now", now_after_both_read)
    return both_read, waited
