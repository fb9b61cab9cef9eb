"""The model directory is plain diffusers + sdpipe.json, loadable by vanilla diffusers, never pickled."""

import json
import stat
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DModel

from conftest import random_model
from sdpipe.conditioning import Conditioning
from sdpipe.models import load_model, weights_hash
from sdpipe.sampling import SampleSpec, denoise, make_scheduler
from sdpipe.sampling.start import Start


def test_layout_and_no_pickle(tiny_model_dir: Path) -> None:
    files = {p.relative_to(tiny_model_dir).as_posix() for p in tiny_model_dir.rglob("*") if p.is_file()}
    assert {
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "sdpipe.json",
    } <= files
    assert all(f.endswith((".json", ".safetensors")) for f in files), files


def test_metadata(tiny_model_dir: Path) -> None:
    meta = json.loads((tiny_model_dir / "sdpipe.json").read_text())
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["null_label"] == 10
    assert meta["image_size"] == 8 and meta["channels"] == 1
    assert meta["value_range"] == [0.0, 16.0]
    assert meta["dataset_id"].startswith("sha256:")
    assert meta["config"]["train"]["steps"] == 6
    assert {"sdpipe", "torch", "diffusers"} <= set(meta["versions"])
    unet_cfg = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    assert unet_cfg["num_class_embeds"] == 11


def test_vanilla_diffusers_loads_and_samples(tiny_model_dir: Path) -> None:
    """A plain diffusers loop (no sdpipe code) over the saved folders gives the same images as sdpipe."""
    unet = UNet2DModel.from_pretrained(tiny_model_dir, subfolder="unet")
    sched_cfg = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    sched = getattr(diffusers, sched_cfg["_class_name"]).from_pretrained(tiny_model_dir, subfolder="scheduler")
    assert sched.config.prediction_type == "v_prediction"

    loaded = load_model(tiny_model_dir)
    assert weights_hash(unet) == loaded.meta.weights_hash
    for a, b in zip(unet.state_dict().values(), loaded.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    sched.set_timesteps(4)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t, class_labels=labels).sample, t, x).prev_sample
    spec = SampleSpec("dpmpp_2m", 4, 1.0, 4)
    parts = loaded.parts
    encoded = parts.encode([Conditioning(label=str(i)) for i in range(4)], guided=False)
    sched = make_scheduler(spec.sampler, loaded.scheduler_config)
    sched.set_timesteps(spec.steps)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    ours = denoise(parts, sched, Start(noise * sched.init_noise_sigma), encoded, spec, gens, guided=False)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(ours, x)


def test_missing_parts_give_clear_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    import pytest

    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "sdpipe.json").unlink()
    with pytest.raises(FileNotFoundError, match="sdpipe.json is missing"):
        load_model(broken)


def modes(folder: Path) -> dict[str, int]:
    """Permission bits of a folder and of everything in it, by relative path."""
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_a_saved_model_gets_the_usual_modes(tmp_path: Path, umask: int) -> None:
    model = random_model(tmp_path / "model", 0)
    found = modes(model)
    assert found == {p: (0o777 if (model / p).is_dir() else 0o666) & ~umask for p in found}
    assert found["."] == (0o755 if umask == 0o022 else 0o750)
