"""Training on any validated source: an image folder end to end through the CLI, with the data's identity
and preprocessing recorded in the model, changed sources refused, and generation in the source's range."""

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY
from sdpipe.cli import app

runner = CliRunner()


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("light", 200)):
        (root / name).mkdir(parents=True)
        for i in range(24):
            pixels = np.clip(rng.normal(level, 20, (12, 12)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i:02d}.png")
    return root


def _sets(src: Path, validated: Path) -> list[str]:
    sets = [
        *TINY,
        "train.steps=4",
        "train.batch_size=8",
        "sample.micro_batch=4",
        "data.source=folder",
        f"data.path={src}",
        f"data.validated_dir={validated}",
        "data.resolution=8",
        "data.crop=random",
        "data.random_flip=true",
        "data.channels=rgb",
    ]
    return [a for s in sets for a in ("--set", s)]


def test_train_on_an_image_folder(tmp_path: Path) -> None:
    src, validated = _folder(tmp_path / "src"), tmp_path / "validated"
    sets = _sets(src, validated)
    res = runner.invoke(app, ["data", "validate", str(src), "--out", str(validated), "--quiet", *sets])
    assert res.exit_code == 0, res.output
    report = json.loads((validated / "report.json").read_text())

    res = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--quiet", *sets])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "run" / "model" / "sdpipe.json").read_text())
    assert meta["dataset_id"] == report["dataset_id"]
    assert meta["class_names"] == ["dark", "light"] and meta["image_size"] == 8 and meta["channels"] == 3
    assert meta["value_range"] == [0.0, 255.0]
    assert meta["preprocess"]["resolution"] == 8 and meta["preprocess"]["random_flip"] is True

    res = runner.invoke(app, ["generate", "--model", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "g"),
                              "--n", "2", "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output
    image = Image.open(tmp_path / "g" / "00000.png")
    assert image.size == (8, 8) and image.mode == "RGB"  # grayscale sources trained as RGB come back RGB

    # a source that changed since validation is refused, naming the file; --revalidate takes the new data
    changed = src / "dark" / "03.png"
    Image.fromarray(np.zeros((12, 12), np.uint8), "L").save(changed)
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "run2"), "--quiet", *sets])
    assert res.exit_code == 2 and "03.png" in res.output, res.output
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "run2"), "--quiet", "--revalidate", *sets])
    assert res.exit_code == 0, res.output
    new_id = json.loads((tmp_path / "run2" / "model" / "sdpipe.json").read_text())["dataset_id"]
    assert new_id == json.loads((validated / "report.json").read_text())["dataset_id"] != report["dataset_id"]
