"""The emoji example's two parts on a fake emoji-datasource package (no network): the converter (`data.emoji`:
images composited and resized, captions, category folders as labels, what is left out, refusals) and the
held-out judge (`evaluate.captioned_judge`), which must score real held-out images as the real images they are
and a trained model's samples through the one generation path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdpipe.config import load_config
from sdpipe.data.emoji import EmojiPackageError, caption_of, category_folder, write_emoji_folder
from sdpipe.data.validate import validate

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
KINDS = {"Smileys & Emotion": ("ellipse", (250, 200, 40)), "Flags": ("rectangle", (200, 30, 30)),
         "Food & Drink": ("polygon", (40, 160, 60))}  # fmt: skip


def _fake_package(root: Path, per_category: int = 16) -> Path:
    """emoji.json + img/twitter/64/*.png: per category, shapes of one kind on transparency, sizes varied."""
    images = root / "img" / "twitter" / "64"
    images.mkdir(parents=True)
    entries, rng = [], np.random.default_rng(0)
    for c, (category, (kind, colour)) in enumerate(KINDS.items()):
        for i in range(per_category):
            im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
            lo, hi = (int(v) for v in rng.integers(4, 20, 2))
            box = (lo, lo, 64 - hi, 64 - hi)
            draw = ImageDraw.Draw(im)
            if kind == "polygon":
                draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
            else:
                getattr(draw, kind)(box, fill=colour)
            name = f"{c:x}{i:03x}.png"
            im.save(images / name)
            entry = {"name": f"{kind.upper()} {i}", "image": name, "category": category}
            entries.append(entry | {"subcategory": f"{kind}-things", "sort_order": len(entries)})
    entries.append({"name": "SKIN TONE", "image": "none.png", "category": "Component", "subcategory": "skin-tone"})
    entries.append({"name": "NO IMAGE", "image": "missing.png", "category": "Flags", "subcategory": "flag"})
    (root / "emoji.json").write_text(json.dumps(entries))
    return root


def test_converter_writes_a_captioned_labelled_folder(tmp_path: Path) -> None:
    package = _fake_package(tmp_path / "package", per_category=4)
    counts = write_emoji_folder(package, tmp_path / "out", size=32)
    assert counts == {"smileys-emotion": 4, "flags": 4, "food-drink": 4}  # Component and missing images left out
    rows = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert rows[0] == {"file_name": "smileys-emotion/0000.png", "text": "ellipse 0, ellipse things"}
    with Image.open(tmp_path / "out" / rows[0]["file_name"]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
        pixels = np.asarray(im)
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # transparency on the white background
    assert "CC-BY 4.0" in (tmp_path / "out" / "LICENCE.txt").read_text()
    with pytest.raises(ValueError, match="not an empty folder"):
        write_emoji_folder(package, tmp_path / "out")
    with pytest.raises(EmojiPackageError, match="npm pack emoji-datasource"):
        write_emoji_folder(tmp_path, tmp_path / "other")


def test_data_emoji_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdpipe.cli import app

    package = _fake_package(tmp_path / "package", per_category=2)
    result = CliRunner().invoke(app, ["data", "emoji", str(package), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "6 images in 3 categories" in result.output and (tmp_path / "out" / "metadata.jsonl").is_file()
    result = CliRunner().invoke(app, ["data", "emoji", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "emoji.json" in result.output


def test_captions_and_folder_names() -> None:
    entry = {"name": "GRINNING FACE", "subcategory": "face-smiling"}
    assert caption_of(entry) == "grinning face, face smiling"
    assert caption_of({"name": "Egypt Flag", "subcategory": ""}) == "egypt flag"
    assert category_folder("Smileys & Emotion") == "smileys-emotion"


@pytest.fixture(scope="module")
def emoji_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A tiny scratch model trained on the converted fake package, with a held-out split."""
    from sdpipe.pipeline_t2i import train_t2i_model

    root = tmp_path_factory.mktemp("emoji")
    write_emoji_folder(_fake_package(root / "package"), root / "data", size=32)
    cfg = load_config(None, [
        "data.source=folder", f"data.path={root / 'data'}", f"data.validated_dir={root / 'validated'}",
        "data.test_fraction=0.3", "data.resolution=32", "data.channels=rgb", "model.type=text-to-image",
        "train.method=scratch", "diffusion.formulation=ddpm", "train.loss_weighting=uniform",
        "train.uncertainty_weighting=false", "model.block_out_channels=[32, 32]", "model.norm_num_groups=32",
        "model.attention_head_dim=8", "model.vae_channels=[8, 16]", "model.text_width=32", "train.vae_steps=2",
        "train.steps=2", "train.batch_size=4", f"train.cache_dir={root / 'cache'}",
    ])  # fmt: skip
    validate(str(root / "data"), root / "validated", cfg.data)
    trained = train_t2i_model(cfg, root / "run", show_progress=False)
    return trained.model.path, cfg


def test_held_out_judge_scores_real_held_out_images_as_real(emoji_run, monkeypatch: pytest.MonkeyPatch) -> None:
    import sdpipe.evaluate.captioned_judge as cj
    from sdpipe.data.imageset import split_arrays

    model, cfg = emoji_run
    test = split_arrays(cfg.data, "test")
    asked: list[tuple[list[str], int]] = []
    settings: list[tuple[str, int, float]] = []

    def real_images(model_dir, captions, steps, guidance, show, label, first_seed, size, sampler):  # real as samples
        asked.append((captions, first_seed))
        settings.append((sampler, steps, guidance))
        return test.images.transpose(0, 2, 3, 1).astype(np.uint8)

    monkeypatch.setattr(cj, "sample_prompts", real_images)
    got = cj.judge_held_out(model, cj.training_data(model), sets=2, show_progress=False)
    from sdpipe.data import open_split

    n = got["n_per_set"]
    assert n == len(test.labels) >= 10 and [seed for _, seed in asked] == [1_000_000, 1_000_000 + n]
    assert all(captions == open_split(cfg.data, "test").captions for captions, _ in asked)  # in label order
    assert got["prompt_adherence"]["mean"] == pytest.approx(got["prompt_adherence_real"])
    assert got["prompt_adherence_real"] > got["prompt_adherence_chance"]
    assert got["fd_ratio"]["mean"] < 1e-3  # identical to the reference (sqrtm leaves rounding)
    assert sorted(got["classes"]) == ["flags", "food-drink", "smileys-emotion"]
    # sampled as the run's sample section says (the model records it), not with fixed settings
    s = cfg.sample
    assert settings == [(s.sampler, s.steps, s.guidance)] * 2 and got["sampling"]["from"] == "the run's sample section"


def test_held_out_judge_samples_the_model_and_the_cli_writes_it(emoji_run, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdpipe.cli import app

    model, _ = emoji_run
    result = CliRunner().invoke(app, ["evaluate", "--model", str(model), "--held-out", "--out", str(tmp_path), "-q"])
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "held_out.json").read_text())
    assert figures["sets"] == 4 and len(figures["prompt_adherence"]["values"]) == 4
    assert 0 <= figures["prompt_adherence"]["mean"] <= 1 and figures["fd_ratio"]["mean"] > 0
    assert "prompt adherence" in result.output
    refused = CliRunner().invoke(
        app, ["evaluate", "--model", str(model), "--held-out", "--n", "5", "--out", str(tmp_path / "x")]
    )
    assert refused.exit_code != 0 and "takes none of --n" in refused.output
