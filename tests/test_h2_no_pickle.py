"""No pickle is ever loaded: a pickle whose unpickling leaves a marker file is put wherever a loader might look
for weights (`.bin`, `.pt`, `.ckpt` beside the safetensors, or instead of them), and every loader of models,
of the registry and of the server is run; the marker never appears."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sdpipe.cli import app as cli_app
from sdpipe.models import load_model
from sdpipe.registry import Registry, load
from sdpipe.serve.app import create_app
from sdpipe.serve.holder import model_resolver
from sdpipe.serve.settings import ServeSettings
from test_serve import make_model, wait_ready

PICKLE_NAMES = [
    "unet/diffusion_pytorch_model.bin",
    "unet/pytorch_model.bin",
    "unet/diffusion_pytorch_model.ckpt",
    "unet/model.pt",
    "scheduler/scheduler.pt",
    "pytorch_model.bin",
    "model.ckpt",
]


class LeavesAMark:
    """Unpickling this creates the file `marker` (pickle calls `open(marker, "w")`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "UNPICKLED"


def plant(folder: Path, marker: Path) -> Path:
    """Pickles that would leave `marker` if unpickled, at every name a weights loader might try."""
    for name in PICKLE_NAMES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": LeavesAMark(marker)}, folder / name)
    return folder


def test_the_marker_works(tmp_path: Path, marker: Path) -> None:
    plant(tmp_path / "m", marker)
    torch.load(tmp_path / "m" / "model.ckpt", weights_only=False)  # what the loaders below must never do
    assert marker.exists()


def test_no_loader_unpickles(tmp_path: Path, marker: Path) -> None:
    model = plant(make_model(tmp_path / "model"), marker)
    load_model(model)
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.register(model, "tiny")
    registry.verify("tiny:1")
    registry.load("tiny:1")
    load("tiny:1", registry.url)
    load(model, registry.url)
    args = ["generate", "--model", str(model), "--n", "1", "--out", str(tmp_path / "out"), "--quiet"]
    assert CliRunner().invoke(cli_app, args).exit_code == 0
    with TestClient(create_app(model_resolver("tiny@latest", registry.url), ServeSettings())) as c:
        wait_ready(c)
        assert c.post("/v1/generate", json={"n": 1}).status_code == 200
    assert not marker.exists()


def test_weights_only_as_pickles_are_refused_unread(tmp_path: Path, marker: Path) -> None:
    model = plant(make_model(tmp_path / "model"), marker)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # only the pickles are left
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors is missing"):
        load_model(model)
    shutil.copy(model / "unet" / "model.pt", tmp_path / "inception.pt")
    from sdpipe.evaluate.inception import load_fid_inception

    with pytest.raises(Exception, match="Weights only load failed"):  # torch's own refusal
        load_fid_inception(tmp_path / "inception.pt")
    assert not marker.exists()
