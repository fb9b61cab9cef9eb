"""Shared fixtures: a tiny config and a tiny trained model (random-ish weights, seconds to make)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdpipe.config import PipelineConfig, load_config

TINY = [
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


@pytest.fixture(scope="session")
def tiny_config() -> PipelineConfig:
    return load_config(None, TINY)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_config: PipelineConfig) -> Path:
    from sdpipe.pipeline import train_model

    run = tmp_path_factory.mktemp("tiny_run")
    return train_model(tiny_config, run, show_progress=False).model.path
