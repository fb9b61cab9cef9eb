"""`sdpipe generate` / `replay` / `models inspect` on tiny Stable Diffusion folders and single files: flags,
samples.jsonl, the web-UI PNG metadata (read by sd-parsers), bitwise replay, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sdpipe.cli import app
from sdpipe.sampling.infotext import parse_parameters

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
runner = CliRunner()


def generate(model: Path, out: Path, *args: str) -> list[dict]:
    result = runner.invoke(app, ["generate", "--model", str(model), "--out", str(out), "--quiet", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


BASE = ["--width", "32", "--height", "32", "--steps", "3", "--sampler", "Euler a", "--guidance", "5"]


def test_generate_records_everything_and_images_do_not_depend_on_n(sdxl_pipeline: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\nthree green squares\n")
    recs = generate(
        sdxl_pipeline,
        tmp_path / "a",
        "--prompts",
        str(prompts),
        "--n",
        "3",
        "--seed",
        "5",
        "--negative-prompt",
        "blurry",
        *BASE,
    )
    assert [r["prompt"] for r in recs] == ["a red circle", "three green squares", "a red circle"]
    r = recs[1]
    assert (r["seed"], r["steps"], r["sampler"], r["guidance"], r["width"], r["height"]) == (
        6,
        3,
        "euler_a",
        5.0,
        32,
        32,
    )
    assert r["negative_prompt"] == "blurry" and r["model"].startswith("sha256:") and r["loras"] == []
    # image 1 alone (seed 6) and inside another batch size: the same bytes
    generate(
        sdxl_pipeline,
        tmp_path / "b",
        "--prompt",
        "three green squares",
        "--n",
        "1",
        "--seed",
        "6",
        "--negative-prompt",
        "blurry",
        *BASE,
    )
    generate(
        sdxl_pipeline,
        tmp_path / "c",
        "--prompts",
        str(prompts),
        "--n",
        "3",
        "--seed",
        "5",
        "--negative-prompt",
        "blurry",
        "--batch-size",
        "2",
        *BASE,
    )
    first = (tmp_path / "a" / "00001.png").read_bytes()
    assert first == (tmp_path / "b" / "00000.png").read_bytes() == (tmp_path / "c" / "00001.png").read_bytes()
    with Image.open(tmp_path / "a" / "00001.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"
        params = parse_parameters(im.text["parameters"])
    assert params["prompt"] == "three green squares" and params["negative_prompt"] == "blurry"
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"], params["Size"]) == (
        "3",
        "Euler a",
        "5.0",
        "6",
        "32x32",
    )
    assert params["Model hash"] == r["model"].removeprefix("sha256:")[:10]


def test_third_party_reader_and_bitwise_replay(sd1_pipeline: Path, tmp_path: Path) -> None:
    from sd_parsers import ParserManager

    generate(
        sd1_pipeline,
        tmp_path / "a",
        "--prompt",
        "a blue triangle",
        "--n",
        "2",
        "--seed",
        "40",
        "--clip-skip",
        "2",
        *BASE,
    )
    png = tmp_path / "a" / "00001.png"
    info = ParserManager().parse(str(png))
    assert info is not None and info.full_prompt == "a blue triangle"
    sampler = info.samplers[0]
    assert sampler.name == "Euler a" and sampler.parameters["seed"] == "41" and sampler.parameters["steps"] == "3"
    result = runner.invoke(app, ["replay", str(png), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "00000.png").read_bytes() == png.read_bytes()


@pytest.mark.parametrize("fixture", ["sd1_single_file", "sd2v_single_file", "sdxl_single_file"])
def test_single_file_generates_as_its_folder(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A web-UI checkpoint with a config folder gives the images its diffusers folder gives."""
    from sd_fixtures import single_file_folders

    file = request.getfixturevalue(fixture)
    weights, config = single_file_folders(file)
    generate(file, tmp_path / "f", "--prompt", "a cat", "--n", "1", "--config", str(config), *BASE)
    generate(weights, tmp_path / "d", "--prompt", "a cat", "--n", "1", *BASE)
    with Image.open(tmp_path / "f" / "00000.png") as a, Image.open(tmp_path / "d" / "00000.png") as b:
        assert list(a.getdata()) == list(b.getdata())
    result = runner.invoke(app, ["models", "inspect", str(file), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["kind"] == "sd-single-file"
    # diffusers tells SD 2 by its 1024-wide cross-attention, which the tiny SD2-v lacks: it reads as sd1, and loads
    # as SD2-v through its --config (crafted full-width headers are told apart in test_model_files)
    want = {"sd1_single_file": "sd1", "sd2v_single_file": "sd1", "sdxl_single_file": "sdxl"}[fixture]
    assert json.loads(result.output)["architecture"] == want


def test_a_single_file_that_does_not_fit_its_shipped_config_is_refused_offline(
    sd1_single_file: Path, tmp_path: Path
) -> None:
    """Without --config the shipped SD 1.5 config is used (no download); a tiny model does not fit it."""
    result = runner.invoke(
        app, ["generate", "--model", str(sd1_single_file), "--out", str(tmp_path / "o"), "--prompt", "x"]
    )
    assert result.exit_code == 2 and "do not fit the config it was loaded with (sd15)" in result.output
    assert "--config" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--label", "3", "--prompt", "x"], "not --label"),
        ([], "one of --prompt TEXT or --prompts FILE"),
        (["--prompt", "a (cat:1.2)"], "prompt weighting"),
        (["--prompt", "x", "--width", "30"], "--width 30: give a multiple of 8"),
        (["--prompt", "x", "--sampler", "plms"], "unknown sampler 'plms'"),
        (["--prompt", "x", "--dtype", "float8"], "--dtype 'float8'"),
    ],
)
def test_bad_requests_are_one_line_errors(sd1_pipeline: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["generate", "--model", str(sd1_pipeline), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("error:") == 1 and "Traceback" not in result.output


def test_pickles_and_loras_given_as_models_are_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    result = runner.invoke(app, ["generate", "--model", str(ckpt), "--out", str(tmp_path / "o"), "--prompt", "x"])
    assert result.exit_code == 2 and "pickle" in result.output and "safetensors" in result.output
    from safetensors.torch import save_file

    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    result = runner.invoke(app, ["generate", "--model", str(lora), "--out", str(tmp_path / "o"), "--prompt", "x"])
    assert result.exit_code == 2 and "LoRA" in result.output and "--lora" in result.output


def test_img2img_and_inpainting_from_the_command_line(
    sd1_inpaint_pipeline: Path, sd1_pipeline: Path, tmp_path: Path
) -> None:
    """--image/--strength/--mask reach the pipelines' paths; the records name the inputs by hash, the PNG says
    `Denoising strength`, and replay finds the inputs again and regenerates the bytes."""
    import numpy as np

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (44, 36, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    m = np.zeros((44, 36), np.uint8)
    m[10:30, 5:25] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    steps = ["--steps", "4", "--sampler", "euler", "--seed", "3"]
    recs = generate(
        sd1_pipeline,
        tmp_path / "i2i",
        "--prompt",
        "a cat",
        "--n",
        "2",
        "--image",
        str(tmp_path / "in.png"),
        "--strength",
        "0.5",
        *steps,
    )
    assert (recs[0]["width"], recs[0]["height"], recs[0]["strength"]) == (32, 40, 0.5)  # the image's, rounded to 8
    assert len(recs[0]["image"]) == 64 and recs[0]["mask"] is None
    with Image.open(tmp_path / "i2i" / "00001.png") as im:
        assert parse_parameters(im.text["parameters"])["Denoising strength"] == "0.5"
    recs = generate(
        sd1_inpaint_pipeline,
        tmp_path / "inp",
        "--prompt",
        "a cat",
        "--n",
        "1",
        "--image",
        str(tmp_path / "in.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        *steps,
    )
    assert recs[0]["mask"] is not None and recs[0]["strength"] is None
    from sdpipe import inputs

    inputs._cache.clear()  # as in a new process: replay reads the inputs from the paths recorded, checked by hash
    for folder in ("i2i", "inp"):
        png = tmp_path / folder / "00000.png"
        result = runner.invoke(app, ["replay", str(png), "--out", str(tmp_path / f"r-{folder}")])
        assert result.exit_code == 0, result.output
        assert (tmp_path / f"r-{folder}" / "00000.png").read_bytes() == png.read_bytes()
    inputs._cache.clear()
    Image.fromarray(m[::-1].copy()).save(tmp_path / "mask.png")  # the input changed since: refused, not misused
    result = runner.invoke(app, ["replay", str(tmp_path / "inp" / "00000.png"), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "has changed since the image was made" in result.output
    # an inpainting UNet without a mask, a mask without an image: one-line errors
    for model, args, message in [
        (sd1_inpaint_pipeline, ["--prompt", "x"], "is an inpainting model: give --image and --mask"),
        (sd1_pipeline, ["--prompt", "x", "--mask", str(tmp_path / "mask.png")], "--mask needs --image"),
        (sd1_pipeline, ["--prompt", "x", "--image", str(tmp_path / "nope.png")], "--image"),
    ]:
        result = runner.invoke(app, ["generate", "--model", str(model), "--out", str(tmp_path / "bad"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
