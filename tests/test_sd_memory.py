"""Memory and precision: a half-precision VAE decode that overflows is redone in float32 and logged (black images
are SD tools' most reported failure); VAE tiling and attention slicing are options the PNG records and replay
sets again; running out of device memory names the options that help."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sdpipe.cli import app
from sdpipe.conditioning import Conditioning
from sdpipe.models.pipelines import PipelineParts, load_pipeline
from sdpipe.sampling.generate import Row, SampleSpec, generate_items

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
runner = CliRunner()


def test_an_overflowing_half_precision_decode_is_redone_in_float32(
    sd1_pipeline: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_pipeline(sd1_pipeline, dtype="float16")
    with torch.no_grad():  # the VAE's last layer now overflows float16 (65504) but not float32
        model.pipe.vae.decoder.conv_out.bias.fill_(65504)
        model.pipe.vae.decoder.conv_out.weight.mul_(1000)
    row = Row(0, Conditioning(prompt="a cat", width=32, height=32))
    with caplog.at_level(logging.WARNING, logger="sdpipe.models"):
        image = generate_items(model.parts, [row], SampleSpec("euler", 2, 3.0, 1))[row]
    assert torch.isfinite(image).all() and image.dtype == torch.float32
    assert "redone in float32" in caplog.text
    assert model.pipe.vae.dtype == torch.float16  # the VAE is left in its own dtype


def test_vae_tiling_is_recorded_and_replayed(sd1_pipeline: Path, tmp_path: Path) -> None:
    args = ["--prompt", "a cat", "--n", "1", "--width", "96", "--height", "96", "--steps", "2", "--quiet"]
    for name, extra in (("tiled", ["--vae-tiling", "--attention-slicing"]), ("plain", [])):
        result = runner.invoke(
            app, ["generate", "--model", str(sd1_pipeline), "--out", str(tmp_path / name), *args, *extra]
        )
        assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "tiled" / "00000.png") as im:
        assert json.loads(im.text["sdpipe"])["memory"] == {"vae_tiling": True, "attention_slicing": True}
    result = runner.invoke(app, ["replay", str(tmp_path / "tiled" / "00000.png"), "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again" / "00000.png").read_bytes() == (tmp_path / "tiled" / "00000.png").read_bytes()
    with Image.open(tmp_path / "tiled" / "00000.png") as a, Image.open(tmp_path / "plain" / "00000.png") as b:
        assert list(a.getdata()) != list(b.getdata())  # 96 px is past the tiny VAE's 64 px tile: tiling ran


def test_out_of_memory_names_the_options_that_help(
    sd1_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(self: PipelineParts, z: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(PipelineParts, "_decode_row", no_memory)
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(sd1_pipeline),
            "--out",
            str(tmp_path / "o"),
            "--prompt",
            "x",
            "--n",
            "1",
            "--steps",
            "1",
            "--width",
            "32",
            "--height",
            "32",
        ],
    )
    assert result.exit_code == 2 and "--vae-tiling" in result.output and "Traceback" not in result.output
