"""Generation: seed-per-image reproducibility that holds by construction, and the files written."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdpipe.models import load_model
from sdpipe.sampling import PIXEL_SAMPLERS, SampleSpec, generate
from sdpipe.sampling.files import generate_files, to_pixels


def _gen(model_dir: Path, seeds: list[int], labels: list[int], spec: SampleSpec) -> torch.Tensor:
    m = load_model(model_dir)
    return generate(m.unet, m.scheduler_config, seeds, labels, shape=(1, 8, 8), null_label=10, spec=spec)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])  # deterministic and stochastic
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_image_depends_only_on_its_seed(tiny_model_dir: Path, sampler: str, guidance: float) -> None:
    spec = SampleSpec(sampler, 4, guidance, micro_batch=8)
    eight = _gen(tiny_model_dir, list(range(100, 108)), [i % 10 for i in range(100, 108)], spec)
    one = _gen(tiny_model_dir, [103], [3], spec)
    assert torch.equal(one[0], eight[3])
    # across a micro-batch boundary and in another order: still the same bits
    many = _gen(tiny_model_dir, list(range(95, 120)), [i % 10 for i in range(95, 120)], spec)
    assert torch.equal(many[8], eight[3])
    assert not torch.equal(eight[0], eight[1])


def test_files_and_jsonl_whatever_the_batch_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    m = load_model(tiny_model_dir)
    spec = SampleSpec("dpmpp_2m", 4, 2.0, micro_batch=8)
    recs = generate_files(m, tmp_path / "a", label="all", n=12, seed=100, spec=spec, batch_size=5, show_progress=False)
    generate_files(m, tmp_path / "b", label="3", n=1, seed=103, spec=spec, batch_size=64, show_progress=False)
    assert [r["label"] for r in recs] == [str(i % 10) for i in range(12)]
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == [f"{i:05d}.png" for i in range(12)]
    a3 = np.asarray(Image.open(tmp_path / "a" / "00003.png"))
    b0 = np.asarray(Image.open(tmp_path / "b" / "00000.png"))
    assert a3.shape == (8, 8) and a3.dtype == np.uint8
    assert np.array_equal(a3, b0)
    lines = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert lines[3] == {
        "file": "00003.png",
        "label": "3",
        "seed": 103,
        "steps": 4,
        "sampler": "dpmpp_2m",
        "guidance": 2.0,
        "model": m.meta.weights_hash,
    }


def test_pixel_mapping_matches_source_intensities() -> None:
    # model range [-1, 1] -> digits value v in 0..16 -> pixel round(v*255/16)
    v = torch.arange(17, dtype=torch.float32)
    x = (v / 16 * 2 - 1).reshape(17, 1, 1, 1)
    assert to_pixels(x, (0.0, 16.0)).ravel().tolist() == [round(i * 255 / 16) for i in range(17)]


@pytest.mark.parametrize("sampler", sorted(PIXEL_SAMPLERS))
def test_every_sampler_runs(tiny_model_dir: Path, sampler: str) -> None:
    x = _gen(tiny_model_dir, [0, 1], [0, 1], SampleSpec(sampler, 3, 1.5, micro_batch=2))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_bad_requests(tiny_model_dir: Path, tmp_path: Path) -> None:
    m = load_model(tiny_model_dir)
    spec = SampleSpec("dpmpp_2m", 2, 1.0, 8)
    with pytest.raises(ValueError, match="unknown label"):
        generate_files(m, tmp_path, label="11", n=1, seed=0, spec=spec, show_progress=False)
    with pytest.raises(ValueError, match="at least 1"):
        generate_files(m, tmp_path, label="all", n=0, seed=0, spec=spec, show_progress=False)
    with pytest.raises(ValueError, match="unknown sampler"):
        _gen(tiny_model_dir, [0], [0], SampleSpec("plms", 2, 1.0, 8))
    with pytest.raises(ValueError, match="distinct"):
        _gen(tiny_model_dir, [0, 0], [0, 0], spec)


def test_png_carries_parameters_and_replays_bitwise(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdpipe.cli import app
    from sdpipe.sampling.files import read_png_params

    m = load_model(tiny_model_dir)
    spec = SampleSpec("ddpm", 4, 2.0, micro_batch=8)  # stochastic sampler and guidance: the hard case
    generate_files(m, tmp_path / "a", label="all", n=6, seed=40, spec=spec, show_progress=False)
    original = tmp_path / "a" / "00005.png"
    with Image.open(original) as im:
        assert "Steps: 4, Sampler: ddpm, CFG scale: 2.0, Seed: 45" in im.text["parameters"]
    params = read_png_params(original)
    assert params["model_hash"] == m.meta.weights_hash and params["label"] == "5" and params["micro_batch"] == 8

    result = CliRunner().invoke(app, ["replay", str(original), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r" / "00000.png")), np.asarray(Image.open(original)))

    Image.new("L", (8, 8)).save(tmp_path / "plain.png")
    result = CliRunner().invoke(app, ["replay", str(tmp_path / "plain.png"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no sdpipe generation parameters" in result.output


def _cli(*args: str):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from sdpipe.cli import app

    return CliRunner().invoke(app, list(args))


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("seed", "n", "message"),
    [
        ("-1", "1", "--seed -1: seeds are whole numbers from 0 to 4294967295"),  # was seed 4294967295's image
        ("4294967296", "1", "--seed 4294967296: seeds are whole numbers from 0 to 4294967295"),
        ("4294967294", "3", "past 4294967295"),  # its third image would take seed 2^32
    ],
)
def test_seeds_outside_the_32_bit_range_are_refused(
    tiny_model_dir: Path, tmp_path: Path, seed: str, n: str, message: str
) -> None:
    result = _cli("generate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--seed", seed, "--n", n)
    assert result.exit_code == 2 and len(_error_lines(result.output)) == 1, result.output
    assert message in result.output
    assert not (tmp_path / "o").exists()


def test_the_largest_seed_is_taken(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = _cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path),
        "--seed",
        "4294967295",
        "--n",
        "1",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "samples.jsonl").read_text())["seed"] == 2**32 - 1


def test_out_must_be_a_new_or_empty_folder_or_overwritten(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = ["--model", str(tiny_model_dir), "--quiet"]
    a_file = tmp_path / "picture.png"
    a_file.write_bytes(b"not a folder")
    result = _cli("generate", *model, "--out", str(a_file))
    assert result.exit_code == 2 and len(_error_lines(result.output)) == 1, result.output  # was a traceback
    assert str(a_file) in result.output and "is a file" in result.output

    out = tmp_path / "out"
    assert _cli("generate", *model, "--out", str(out), "--n", "3").exit_code == 0
    again = _cli("generate", *model, "--out", str(out), "--n", "2", "--seed", "7")
    assert again.exit_code == 2 and len(_error_lines(again.output)) == 1
    assert str(out) in again.output and "--overwrite" in again.output
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]  # untouched

    replaced = _cli("generate", *model, "--out", str(out), "--n", "2", "--seed", "7", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    records = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in out.glob("*.png")) == [r["file"] for r in records] == ["00000.png", "00001.png"]
    assert [r["seed"] for r in records] == [7, 8]

    (out / "notes.txt").write_text("mine")
    refused = _cli("generate", *model, "--out", str(out), "--overwrite")
    assert refused.exit_code == 2 and "notes.txt" in refused.output and (out / "notes.txt").exists()
    replay = _cli("replay", str(out / "00000.png"), "--out", str(out))
    assert replay.exit_code == 2 and "--overwrite" in replay.output


def test_replay_checks_the_weights_themselves(tiny_model_dir: Path, tmp_path: Path) -> None:
    """replay compared the PNG's hash with the one sdpipe.json records, so changed weights replayed silently."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sdpipe.sampling.files import replay

    m = load_model(tiny_model_dir)
    generate_files(m, tmp_path / "a", label="all", n=1, seed=3, spec=SampleSpec("ddim", 2, 1.0, 8), show_progress=False)
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    first = sorted(state)[0]
    state[first] = state[first] + 1.0
    save_file(state, weights)
    with pytest.raises(ValueError, match="pass the right model with --model"):
        replay(tmp_path / "a" / "00000.png", tmp_path / "r", copy)
