"""`sdpipe evaluate` end to end on the tiny model, and looking inside: trajectories, attention maps."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from typer.testing import CliRunner

from conftest import TINY, random_model
from sdpipe.cli import app
from sdpipe.evaluate.command import evaluate_saved_model
from sdpipe.evaluate.inside import attention_maps, trajectory
from sdpipe.models import load_model
from sdpipe.sampling import SampleSpec, generate
from sdpipe.sampling.files import to_pixels

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sdpipe_cache")


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_step_callback_sees_x0_and_changes_no_bits(tiny_model_dir: Path, sampler: str) -> None:
    m = load_model(tiny_model_dir)
    spec = SampleSpec(sampler, 4, 2.0, micro_batch=8)
    seeds, labels = [3, 9, 12], [3, 9, 2]  # two micro-batches
    seen: dict[int, dict[int, torch.Tensor]] = {}
    kw = {"shape": (1, 8, 8), "null_label": 10, "spec": spec}
    with_cb = generate(
        m.unet, m.scheduler_config, seeds, labels, on_step=lambda i, x0: seen.setdefault(i, {}).update(x0), **kw
    )
    plain = generate(m.unet, m.scheduler_config, seeds, labels, **kw)
    assert torch.equal(with_cb, plain)
    assert len(seen) == (2 * 4 - 1 if sampler == "heun" else 4) and all(set(v) == set(seeds) for v in seen.values())
    last = seen[max(seen)]
    for i, s in enumerate(seeds):  # the last clean-image prediction is the image (up to float rounding)
        assert torch.allclose(last[s], plain[i], atol=1e-5)
    assert not torch.allclose(seen[0][3], plain[0], atol=1e-3)  # the first one is not


def test_trajectory_and_attention_maps(tiny_model_dir: Path) -> None:
    m = load_model(tiny_model_dir)
    spec = SampleSpec("dpmpp_2m", 4, 1.0, micro_batch=8)
    seeds, labels = [0, 1, 20], [0, 1, 2]
    traj, final = trajectory(m, spec, seeds, labels)
    assert traj.shape == (3, 4, 8, 8) and traj.dtype == np.uint8
    x = generate(m.unet, m.scheduler_config, seeds, labels, shape=(1, 8, 8), null_label=10, spec=spec)
    assert np.array_equal(final, to_pixels(x, (0.0, 16.0)))

    before = {n: type(a.processor) for n, a in m.unet.named_modules() if isinstance(a, Attention)}
    maps = attention_maps(m, spec, seeds, labels)
    assert set(maps) == set(before) and before  # every attention layer of the tiny model
    for grid in maps.values():
        assert grid.shape[0] == 3 and np.allclose(grid.sum(axis=(1, 2)), 1.0, atol=1e-5)  # a distribution
        assert not np.allclose(grid[0], grid[0].mean())  # not uniform: it is the model's own attention
    after = {n: type(a.processor) for n, a in m.unet.named_modules() if isinstance(a, Attention)}
    assert after == before  # the original processors are back


def _numbers(metrics: dict) -> dict:
    """metrics without timings: what must repeat exactly."""
    drop = {"images_per_s", "seconds", "timings_s"}
    if isinstance(metrics, dict):
        return {k: _numbers(v) for k, v in metrics.items() if k not in drop}
    if isinstance(metrics, list):
        return [_numbers(v) for v in metrics]  # type: ignore[return-value]
    return metrics


def test_evaluate_command_writes_metrics_and_report_and_repeats(
    tiny_model_dir: Path, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDPIPE_CACHE_DIR", str(cache))
    args = ["evaluate", "--model", str(tiny_model_dir), "--n", "20", "--samplers", "ddim,dpmpp_2m", "--steps", "2,4"]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--quiet"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--quiet"])
    assert second.exit_code == 0, second.output
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert _numbers(a) == _numbers(b)  # same seeds, cached features: the same numbers

    d = a["evaluation"]["default"]
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "fd_ratio", "classifier_accuracy"):
        assert isinstance(d[key], float), key
    assert d["n"] == 20 and 0 <= d["precision"] <= 1 and 0 <= d["recall"] <= 1
    assert a["features"]["name"].startswith("featnet-v1:") and a["dataset_id"] in a["features"]["name"]
    assert set(a["classifier"]["per_class"]) == {str(c) for c in range(10)}
    assert len(a["memorization"]["closest_pairs"]) == 8
    assert isinstance(a["validation_loss"]["value"], float) and a["validation_loss"]["images"] > 0
    assert [(r["sampler"], r["steps"]) for r in a["steps_sweep"]] == [
        ("ddim", 2),
        ("ddim", 4),
        ("dpmpp_2m", 2),
        ("dpmpp_2m", 4),
    ]
    assert a["steps_sweep"][3]["fid"] == d["fid"]  # dpmpp_2m x4 is the model's default: measured once
    report = (tmp_path / "a" / "report.html").read_text()
    assert a["features"]["name"] in report and "Memorization" in report and "trajectory" in report
    assert report.count("data:image/png;base64,") == 4  # pairs, steps plot, trajectory, attention
    assert "FD ratio" in first.output


def test_evaluate_command_errors_name_the_problem(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = ["evaluate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x")]
    result = runner.invoke(app, [*base, "--samplers", "ddim,plms"])
    assert result.exit_code == 2 and "--samplers: unknown sampler 'plms'" in result.output
    result = runner.invoke(app, [*base, "--steps", "5,ten"])
    assert result.exit_code == 2 and "--steps" in result.output
    result = runner.invoke(app, [*base, "--inception", str(tmp_path / "none.pth")])
    assert result.exit_code == 2 and "Inception weights not found" in result.output
    result = runner.invoke(app, [*base, "--data", "nowhere"])
    assert result.exit_code == 2 and "data.source" in result.output
    assert not (tmp_path / "x").exists()


def test_validation_loss_is_repeatable_and_uses_the_validation_split(tiny_model_dir: Path) -> None:
    from sdpipe.config import load_config
    from sdpipe.data import load_dataset
    from sdpipe.data.imageset import split_arrays
    from sdpipe.evaluate.full import model_validation_loss

    m = load_model(tiny_model_dir)
    data = load_dataset(load_config().data)
    whole = model_validation_loss(m)
    trained_on = len(split_arrays(load_config().data, "train").images)  # the held-out quarter is never used
    assert whole["images"] == trained_on < len(data.images) and "without a validation split" in whole["on"]
    m.meta.config["data"]["validation_fraction"] = 0.3
    part = model_validation_loss(m)
    assert 0.2 < part["images"] / len(data.images) < 0.4 and "validation split" in part["on"]
    assert part["value"] != whole["value"] and model_validation_loss(m) == part
    m.meta.config["train"]["stepz"] = 1  # a config this version no longer accepts: skipped with the reason
    assert model_validation_loss(m)["value"] is None


def test_steps_sweep_leaves_out_samplers_a_model_cannot_use() -> None:
    from sdpipe.evaluate.command import _applies
    from sdpipe.sampling import edm_scheduler_config, training_scheduler_config

    edm, ddpm = edm_scheduler_config(0.002, 80.0, 0.5), training_scheduler_config("epsilon", "linear", 1000)
    assert [s for s in ("ddim", "dpmpp_2m", "unipc") if _applies(s, edm)] == ["dpmpp_2m"]
    assert all(_applies(s, ddpm) for s in ("ddim", "dpmpp_2m", "unipc"))


def test_default_sweep_takes_the_samplers_the_model_takes(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDPIPE_CACHE_DIR", str(cache))
    edm = random_model(tmp_path / "edm", sets=[*TINY, "diffusion.formulation=edm", "train.loss_weighting=edm"])
    quiet = {"n": 20, "steps": [2], "show_progress": False}
    default = evaluate_saved_model(edm, tmp_path / "a", **quiet)  # type: ignore[arg-type]
    assert [r["sampler"] for r in default["steps_sweep"]] == ["euler", "dpmpp_2m"]
    assert not any("do not apply" in w for w in default.get("warnings", []))  # nothing asked for was left out
    asked = evaluate_saved_model(edm, tmp_path / "b", samplers=["ddim", "dpmpp_2m"], **quiet)  # type: ignore[arg-type]
    assert [r["sampler"] for r in asked["steps_sweep"]] == ["dpmpp_2m"]
    assert any("ddim" in w and "do not apply" in w for w in asked["warnings"])
    with pytest.raises(ValueError, match="none of ddim applies to this model; it takes euler, dpmpp_2m"):
        evaluate_saved_model(edm, tmp_path / "c", samplers=["ddim"], **quiet)  # type: ignore[arg-type]


def digits_folder(root: Path, n: int = 400) -> Path:
    """The first n digits as class-named folders of 8x8 PNGs (pixel = round(v * 255 / 16))."""
    from PIL import Image

    from sdpipe.config import load_config
    from sdpipe.data import load_dataset

    d = load_dataset(load_config().data)
    for i in range(n):
        folder = root / str(d.labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(d.images[i, 0] * 255 / 16).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_evaluate_a_model_trained_on_a_folder_against_its_heldout_split(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every model not trained on the digits failed here ("unknown data source 'folder'")."""
    from sdpipe.config import load_config
    from sdpipe.data.validate import validate
    from sdpipe.pipeline import train_model

    monkeypatch.setenv("SDPIPE_CACHE_DIR", str(cache))
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    src = digits_folder(Path("digits"))
    sets = [*TINY, "data.source=folder", f"data.path={src}", "data.validated_dir=v", "data.test_fraction=0.25"]
    cfg = load_config(None, sets)
    report = validate(str(src), "v", cfg.data)
    assert 0.15 < report["split_counts"]["test"] / report["accepted"] < 0.35
    model = train_model(cfg, "run", show_progress=False).model
    assert set(model.meta.splits or {}) == {"train", "test"}
    saved = model.meta.config["data"]  # recorded absolute: the model finds its data from any folder
    assert saved["path"] == str(tmp_path / "digits") and saved["validated_dir"] == str(tmp_path / "v")
    monkeypatch.chdir(tmp_path / "run")
    metrics = evaluate_saved_model(
        tmp_path / "run" / "model", tmp_path / "e", n=20, samplers=["ddim"], steps=[2], show_progress=False
    )
    assert metrics["heldout_dataset_id"] == model.meta.splits["test"] and not metrics.get("warnings")
    judge = metrics["evaluation"]["judge"]
    assert judge["heldout_images"] == report["split_counts"]["test"]
    assert judge["training_images"] == report["split_counts"]["train"]
    d = metrics["evaluation"]["default"]
    assert d["sets"] == 4 and len(d["intervals"]["fd_ratio"]["values"]) == 4
    assert d["intervals"]["fd_ratio"]["low"] <= d["fd_ratio"] <= d["intervals"]["fd_ratio"]["high"]


def test_evaluate_refuses_a_model_without_a_heldout_split(tmp_path: Path) -> None:
    model = random_model(tmp_path / "m", sets=[*TINY, "data.test_fraction=0"])
    with pytest.raises(ValueError, match="has no held-out test split"):
        evaluate_saved_model(model, tmp_path / "e", n=20, show_progress=False)
