"""Text-to-image evaluation (`sdpipe.evaluate.text2img`) on the tiny SD1 fixture, 2 steps at 32x32: sample sets
as `sdpipe generate` writes them, a grid per prompt, the report; the CLIP score from a tiny random CLIP folder
(checked against torchmetrics' formula, and not a constant); FID/KID against a reference folder with the floor;
one-line errors naming the bad input, before any image is made."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sd_fixtures import BOS_ID, EOS_ID, byte_tokenizer, no_network
from sdpipe.evaluate.clip import ClipModel, load_clip
from sdpipe.evaluate.reference import read_reference, reference_scores
from sdpipe.evaluate.t2i_report import summary_lines
from sdpipe.evaluate.text2img import evaluate_text_to_image
from sdpipe.models.pipelines import LoadedPipeline, load_pipeline
from sdpipe.sampling.generate import SampleSpec, pipeline_sample_spec

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
PROMPTS = ["a red circle", "two blue squares"]
SEED = 11
SIZE = 32


def make_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIPModel (2-layer text and vision towers, 32x32 images, 8x8 patches) with a byte tokenizer
    and CLIP's PIL image processor, saved as transformers saves a real one."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tower = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = {**tower, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID, "vocab_size": 1000}
    config = CLIPConfig(
        text_config={**text, "max_position_embeddings": 77},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    with no_network():
        torch.manual_seed(seed)
        model = CLIPModel(config)
        tokenizer: CLIPTokenizer = byte_tokenizer(folder.parent / f".{folder.name}.tok")
        images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        model.save_pretrained(folder)
        CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def noise_png(path: Path, seed: int, shape: tuple[int, int] = (SIZE, SIZE)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> ClipModel:
    return load_clip(clip_dir)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 noise images (two of them 40x24, in a subfolder), one exact duplicate, and a text file."""
    ref = tmp_path_factory.mktemp("reference")
    for i in range(8):
        noise_png(ref / f"{i:02d}.png", 100 + i)
    noise_png(ref / "more" / "a.png", 200, (24, 40))
    noise_png(ref / "more" / "b.png", 201, (24, 40))
    (ref / "dup.png").write_bytes((ref / "03.png").read_bytes())
    (ref / "notes.txt").write_text("not an image")
    return ref


@pytest.fixture(scope="module")
def model(sd1_pipeline: Path) -> LoadedPipeline:
    return load_pipeline(sd1_pipeline)


def spec() -> SampleSpec:
    return pipeline_sample_spec(1, 2, None, None)  # what `sdpipe generate --steps 2` takes: dpmpp_2m, CFG 7.5


@pytest.fixture(scope="module")
def evaluated(
    model: LoadedPipeline, clip_dir: Path, reference_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("t2i") / "eval"
    prompts = out.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    with no_network():
        metrics = evaluate_text_to_image(
            model, prompts, out, spec=spec(), images_per_prompt=2, sample_sets=2, seed=SEED, width=SIZE,
            height=SIZE, clip=clip_dir, reference=reference_dir, show_progress=False,
        )  # fmt: skip
    return out, metrics


def set_images(out: Path, k: int, n: int = 4) -> np.ndarray:
    folder = out / "sets" / f"set_{k}"
    return np.stack([np.asarray(Image.open(folder / f"{i:05d}.png").convert("RGB")) for i in range(n)])


def test_sets_grids_and_report_are_written(evaluated: tuple[Path, dict]) -> None:
    out, metrics = evaluated
    assert metrics["prompts"] == PROMPTS and metrics["settings"]["seeds"] == [SEED, SEED + 4]
    for k in range(2):
        recs = [json.loads(line) for line in (out / "sets" / f"set_{k}" / "samples.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in recs] == PROMPTS * 2
        assert [r["seed"] for r in recs] == list(range(SEED + 4 * k, SEED + 4 * k + 4))
    assert [g["file"] for g in metrics["grids"]] == ["grids/000.png", "grids/001.png"]
    sets = [set_images(out, 0), set_images(out, 1)]
    with Image.open(out / "grids" / "001.png") as im:
        grid, text = np.asarray(im.convert("RGB")), dict(im.text)
    assert text["prompt"] == PROMPTS[1] and grid.shape == (2 * SIZE + 2, 2 * SIZE + 2, 3)
    # row = sample set, column = the prompt's images in order (images 1 and 3 of each set take prompt 1)
    assert (grid[:SIZE, :SIZE] == sets[0][1]).all() and (grid[SIZE + 2 :, SIZE + 2 :] == sets[1][3]).all()
    assert (grid[SIZE : SIZE + 2] == 255).all()
    page = (out / "report.html").read_text()
    assert "two blue squares" in page and "CLIP score" in page and "floor" in page and page.count("<img") == 2
    assert json.loads((out / "metrics.json").read_text())["clip"]["clip_score"] == metrics["clip"]["clip_score"]
    assert metrics["images_per_s"]["mean"] > 0 and len(metrics["images_per_s"]["values"]) == 2


def test_set_images_are_sdpipe_generates(evaluated: tuple[Path, dict], sd1_pipeline: Path, tmp_path: Path) -> None:
    """Image 3 of set 1 (seed SEED + 4 + 3, prompt 1) is byte for byte what `sdpipe generate` writes."""
    from sdpipe.cli import app

    out, _ = evaluated
    args = ["generate", "--model", str(sd1_pipeline), "--out", str(tmp_path / "g"), "--prompt", PROMPTS[1], "--n", "1"]
    args += ["--seed", str(SEED + 7), "--steps", "2", "--width", str(SIZE), "--height", str(SIZE), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g" / "00000.png").read_bytes() == (out / "sets" / "set_1" / "00003.png").read_bytes()


def test_clip_score_has_intervals_per_prompt_and_overall(evaluated: tuple[Path, dict]) -> None:
    c = evaluated[1]["clip"]
    for key in ("clip_score", "clip_score_mismatched", "prompt_accuracy"):
        iv = c[key]
        assert len(iv["values"]) == 2 and iv["low"] <= iv["mean"] <= iv["high"], key
        assert np.isclose(iv["mean"], np.mean(iv["values"]))
    assert [p["prompt"] for p in c["per_prompt"]] == PROMPTS
    per_prompt_mean = np.mean([p["clip_score"]["mean"] for p in c["per_prompt"]])
    assert np.isclose(per_prompt_mean, c["clip_score"]["mean"])  # balanced prompts: the overall is their mean
    assert c["prompt_accuracy_chance"] == 0.5 and c["model"]["hash"].startswith("sha256:")
    lines = "\n".join(summary_lines(evaluated[1]))
    assert "CLIP score" in lines and "FID" in lines and "2 sample sets" in lines


def test_clip_score_depends_on_the_pairing(evaluated: tuple[Path, dict], clip: ClipModel) -> None:
    """Shuffling which prompt goes with which image changes the score: it measures the pairs, not a constant."""
    out, metrics = evaluated
    images = set_images(out, 0)
    prompts = PROMPTS * 2
    paired = clip.pair_scores(images, prompts)
    shuffled = clip.pair_scores(images, [prompts[i] for i in (1, 0, 3, 2)])
    assert np.abs(paired - shuffled).min() > 1e-3
    assert abs(paired.mean() - shuffled.mean()) > 1e-3
    assert np.isclose(paired.mean(), metrics["clip"]["clip_score"]["values"][0])
    assert np.isclose(shuffled.mean(), metrics["clip"]["clip_score_mismatched"]["values"][0])  # 2 prompts: the other


def test_clip_score_is_torchmetrics_formula(evaluated: tuple[Path, dict], clip: ClipModel) -> None:
    """torchmetrics' own per-pair CLIP score, with a model adapted to transformers 5 (whose get_*_features return
    an output object, not the tensor torchmetrics 1.9 expects), equals ours."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    class Adapted(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.config = model, model.config

        def get_image_features(self, *args: object) -> torch.Tensor:
            return self.inner.get_image_features(*args).pooler_output

        def get_text_features(self, *args: object) -> torch.Tensor:
            return self.inner.get_text_features(*args).pooler_output

    images = set_images(evaluated[0], 1)
    prompts = PROMPTS * 2
    with torch.inference_mode():
        theirs, _ = _clip_score_update(
            list(torch.from_numpy(images).permute(0, 3, 1, 2)), prompts, Adapted(clip.model), clip.processor
        )
    np.testing.assert_allclose(clip.pair_scores(images, prompts), theirs.double().numpy(), atol=1e-4)


def test_fid_and_kid_against_the_reference_with_floor(evaluated: tuple[Path, dict]) -> None:
    r = evaluated[1]["reference"]
    assert r["images"] == 10 and r["duplicates_left_out"] == 1 and (r["heldout_images"], r["floor_images"]) == (5, 5)
    assert r["features"]["name"].startswith("clip-image-embeds:sha256:") and r["compared_per_set"] == 4
    for key in ("fid", "kid_mean", "floor_fid", "floor_kid_mean", "fid_ratio"):
        assert len(r[key]["values"]) == 2 and r[key]["low"] <= r[key]["mean"] <= r[key]["high"], key
    rows = r["per_set"]
    assert [row["fid"] / row["floor_fid"] for row in rows] == pytest.approx(r["fid_ratio"]["values"])
    assert r["floor_fid"]["mean"] > 0 and r["fid"]["mean"] > 0
    assert any("counted once" in w for w in evaluated[1]["warnings"])


class MeanColour:
    """A transparent feature space for checking the protocol: each image's mean R, G, B and their spread."""

    name, description = "test-mean-colour", "mean and std of each channel"

    def features(self, pixels: np.ndarray) -> np.ndarray:
        x = np.stack([np.asarray(p, dtype=np.float64) for p in pixels]) / 255.0
        return np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)


def test_floor_separates_real_like_sets_from_shifted_ones(tmp_path: Path) -> None:
    """Sets drawn like the reference score about the floor (ratio near 1); brighter sets score far above it."""
    rng = np.random.default_rng(0)

    def draw(n: int, shift: int) -> np.ndarray:
        return np.clip(rng.normal(120 + shift, 30, (n, 8, 8, 3)) + rng.normal(0, 10, (n, 1, 1, 3)), 0, 255).astype(
            np.uint8
        )

    for i, image in enumerate(draw(160, 0)):
        Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
    ref = read_reference(tmp_path)
    alike, _ = reference_scores(MeanColour(), ref, [draw(40, 0) for _ in range(4)], seed=1)
    shifted, _ = reference_scores(MeanColour(), ref, [draw(40, 25) for _ in range(4)], seed=1)
    assert 0.3 < alike["fid_ratio"]["mean"] < 3.0, alike["fid_ratio"]
    assert shifted["fid_ratio"]["low"] > alike["fid_ratio"]["high"] and shifted["fid_ratio"]["mean"] > 10
    assert shifted["kid_mean"]["mean"] > shifted["floor_kid_mean"]["mean"]


def test_inception_path_is_used_when_given(
    model: LoadedPipeline, reference_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --inception the file is checked and its features used (stubbed here: the real file is not available
    offline, and the network itself is tested in test_inception.py)."""
    from sdpipe.evaluate import features

    checked: list[Path] = []
    monkeypatch.setattr(features, "check_inception_file", checked.append)
    monkeypatch.setattr(features, "InceptionFeatures", lambda path: MeanColour())
    metrics = evaluate_text_to_image(
        model, PROMPTS, tmp_path / "e", spec=spec(), images_per_prompt=1, sample_sets=2, seed=3, width=SIZE,
        height=SIZE, reference=reference_dir, inception=tmp_path / "pt_inception.pth", show_progress=False,
    )  # fmt: skip
    r = metrics["reference"]
    assert checked == [tmp_path / "pt_inception.pth"] and r["features"]["name"] == MeanColour.name
    assert r["compared_per_set"] == 2 and "clip" not in metrics and np.isfinite(r["fid"]["mean"])


def test_a_second_run_leaves_only_its_own_images(
    evaluated: tuple[Path, dict], model: LoadedPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdpipe.evaluate import t2i_report

    monkeypatch.setattr(t2i_report, "MAX_EMBEDDED", 0)  # big runs link their grids instead of embedding them
    out, _ = evaluated
    copy = out.parent / "again"
    shutil.copytree(out, copy)
    (copy / "mine.txt").write_text("kept")
    evaluate_text_to_image(
        model, PROMPTS[:1], copy, spec=spec(), images_per_prompt=1, sample_sets=1, width=SIZE, height=SIZE,
        show_progress=False,
    )  # fmt: skip
    assert sorted(p.name for p in (copy / "sets").iterdir()) == ["set_0"]
    assert sorted(p.name for p in (copy / "sets" / "set_0").iterdir()) == ["00000.png", "samples.jsonl"]
    assert sorted(p.name for p in (copy / "grids").iterdir()) == ["000.png"] and (copy / "mine.txt").exists()
    assert "clip" not in json.loads((copy / "metrics.json").read_text())
    assert "src='grids/000.png'" in (copy / "report.html").read_text()


def _bad_inputs(tmp: Path, clip_dir: Path, reference_dir: Path) -> dict[str, tuple[dict, type, str]]:
    empty = tmp / "empty"
    empty.mkdir()
    (tmp / "texts").mkdir()
    (tmp / "texts" / "a.txt").write_text("no image here")
    other = tmp / "not_clip"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    pickled = tmp / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    few = tmp / "few"
    for i in range(3):
        noise_png(few / f"{i}.png", i)
    return {
        "missing prompts file": ({"prompts": tmp / "nope.txt"}, FileNotFoundError, "--prompts .*: no such file"),
        "empty prompts file": ({"prompts": tmp / "blank.txt"}, ValueError, "no prompts in it"),
        "missing reference": ({"reference": tmp / "gone", "clip": clip_dir}, FileNotFoundError, "--reference .*gone"),
        "reference without images": ({"reference": tmp / "texts", "clip": clip_dir}, ValueError, "no images in it"),
        "too few reference images": ({"reference": few, "clip": clip_dir}, ValueError, "3 distinct image.*at least 4"),
        "reference without features": ({"reference": reference_dir}, ValueError, "--inception .* or --clip"),
        "missing clip folder": ({"clip": tmp / "noclip"}, FileNotFoundError, "--clip .*noclip: no such folder"),
        "clip folder without config": ({"clip": empty}, ValueError, "--clip .*empty: not a CLIP model folder"),
        "other model type": ({"clip": other}, ValueError, "describes a bert, not a CLIP model"),
        "pickled clip": ({"clip": pickled}, ValueError, "pytorch_model.bin, a pickle"),
        "missing inception file": (
            {"reference": reference_dir, "inception": tmp / "x.pth"},
            FileNotFoundError,
            "Inception weights not found: .*x.pth",
        ),
        "inception without reference": ({"inception": tmp / "x.pth"}, ValueError, "give --reference"),
        "weighting syntax": ({"prompts": ["a (red:1.2) cat"]}, ValueError, "prompt weighting"),
        "no images per prompt": ({"images_per_prompt": 0}, ValueError, "images per prompt"),
        "one image a set for FID": (
            {"prompts": PROMPTS[:1], "reference": reference_dir, "clip": clip_dir},
            ValueError,
            "at least 2 images a set",
        ),
        "out is a file": ({"out": tmp / "blank.txt"}, ValueError, "--out .*blank.txt: a file is in the way"),
    }


BAD_CASES = [
    "missing prompts file", "empty prompts file", "missing reference", "reference without images",
    "too few reference images", "reference without features", "missing clip folder", "clip folder without config",
    "other model type", "pickled clip", "missing inception file", "inception without reference", "weighting syntax",
    "no images per prompt", "one image a set for FID", "out is a file",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_are_named_before_any_work(
    case: str, model: LoadedPipeline, clip_dir: Path, reference_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "blank.txt").write_text("\n  \n")
    kwargs, error, message = _bad_inputs(tmp_path, clip_dir, reference_dir)[case]
    args: dict = {"prompts": PROMPTS, "out": tmp_path / "out", "images_per_prompt": 1, "sample_sets": 1, **kwargs}
    with pytest.raises(error, match=message):
        evaluate_text_to_image(model, spec=spec(), show_progress=False, **args)
    assert not (tmp_path / "out").exists() and (tmp_path / "blank.txt").read_text() == "\n  \n"


def test_the_evaluate_command_takes_prompts_and_clip(sd1_pipeline: Path, clip_dir: Path, tmp_path: Path) -> None:
    """`sdpipe evaluate --model SD --prompts F --clip DIR`: a report and the CLIP score with its interval; a pixel
    model refuses --prompts, and an SD model without --prompts says what it needs."""
    from typer.testing import CliRunner

    from sdpipe.cli import app

    runner = CliRunner()
    (tmp_path / "p.txt").write_text("a red circle\n")
    args = ["evaluate", "--model", str(sd1_pipeline), "--out", str(tmp_path / "e"), "--n", "1", "--quiet"]
    result = runner.invoke(app, [*args, "--prompts", str(tmp_path / "p.txt"), "--clip", str(clip_dir)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e" / "report.html").is_file() and "CLIP" in result.output
    result = runner.invoke(app, [*args[:4], str(tmp_path / "e2")])
    assert result.exit_code == 2 and "give --prompts FILE" in result.output
