"""`train.method: scratch` without `model.pretrained` makes its own components (`sdpipe.train.components`): a VAE
trained on the run's images in RUN/vae and a small random text encoder, saved as RUN/components, which the UNet
then trains on; a run cut while its VAE trains resumes to the same weights; an earlier start's components are
never reused silently; `--overwrite` removes them; vanilla diffusers samples the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sdpipe.config import PipelineConfig, load_config
from sdpipe.data.shapes import write_folder
from sdpipe.data.validate import validate
from sdpipe.pipeline_t2i import train_t2i_model
from sdpipe.train.run_dir import RunFolderError, claim_run_dir

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own")
    write_folder(root / "data", 48, 8, seed=2)
    validate(str(root / "data"), root / "validated", _config(root, root / "cache").data)
    return root


def _config(root: Path, cache: Path, *extra: str) -> PipelineConfig:
    return load_config(None, [
        "data.source=folder", f"data.path={root / 'data'}", f"data.validated_dir={root / 'validated'}",
        "data.resolution=32", "data.channels=rgb", "model.type=text-to-image", "train.method=scratch",
        "diffusion.formulation=ddpm", "train.loss_weighting=uniform", "train.uncertainty_weighting=false",
        "model.block_out_channels=[32, 32]", "model.norm_num_groups=32",
        "model.attention_head_dim=8", "model.vae_channels=[8, 16]", "model.text_width=32",
        "train.vae_steps=4", "train.steps=2", "train.batch_size=4", f"train.cache_dir={cache}", *extra,
    ])  # fmt: skip


def _vae_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "components" / "vae" / "diffusion_pytorch_model.safetensors")


def test_scratch_without_pretrained_trains_its_own_components(shapes: Path, tmp_path: Path) -> None:
    import diffusers

    run = tmp_path / "run"
    trained = train_t2i_model(_config(shapes, tmp_path / "cache"), run, show_progress=False)
    assert (run / "vae" / "config.yaml").is_file() and (run / "vae" / "checkpoints").is_dir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["pretrained"] is None  # the run's config says what the user said
    record = json.loads((trained.model.path / "sdpipe_training.json").read_text())
    assert record["base"]["path"] == str((run / "components").resolve())  # the UNet trained on these components
    comps = diffusers.StableDiffusionPipeline.from_pretrained(run / "components", local_files_only=True)
    assert comps.vae.config.block_out_channels == [8, 16] and comps.text_encoder.config.hidden_size == 32
    assert comps.vae.config.scaling_factor != 0.18215  # the own VAE's measured latent scale
    assert trained.seconds["components"] > 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(trained.model.path, local_files_only=True)
    assert torch.equal(pipe.vae.encoder.conv_in.weight, comps.vae.encoder.conv_in.weight)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_a_run_cut_while_its_vae_trains_resumes_to_the_same_weights(shapes: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from sdpipe.data import open_split
    from sdpipe.train.components import make_components, start_own_components, vae_training_config
    from sdpipe.train.run_dir import saved_run_config

    whole, cut = tmp_path / "whole", tmp_path / "cut"

    cfg = _config(shapes, tmp_path / "cache", "train.vae_steps=6", "train.checkpoint_every=2")
    train_t2i_model(cfg, tmp_path / "whole", show_progress=False)

    def stop(step: int, row: dict) -> None:
        if step == 3:
            raise Interrupt

    start_own_components(cfg, cut, resume=False)
    with pytest.raises(Interrupt):
        make_components(cfg, open_split(cfg.data), cut, progress=stop)
    assert not (cut / "components").exists()
    with pytest.raises(RunFolderError, match="--resume"):
        train_t2i_model(cfg, cut, show_progress=False)
    claim_run_dir(cut, resume=True, overwrite=False)  # a run cut in its VAE is a run to resume ...
    assert saved_run_config(cut) == cfg.model_dump(mode="json")  # ... as itself: `sdpipe train --out RUN --resume`
    train_t2i_model(load_config(None, [], base=saved_run_config(cut)), cut, show_progress=False, resume=True)
    a, b = _vae_weights(tmp_path / "whole"), _vae_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert vae_training_config(cfg).train.steps == 6
    u, v = (load_file(r / "model" / "unet" / "diffusion_pytorch_model.safetensors") for r in (whole, cut))
    assert all(torch.equal(u[k], v[k]) for k in u)


def test_components_of_an_earlier_start_are_not_reused_unless_resuming(shapes: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = _config(shapes, tmp_path / "cache")
    train_t2i_model(cfg, run, show_progress=False)
    for name in ("config.yaml", "metrics.jsonl", "checkpoints", "model"):  # only the components are left
        path = run / name
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
    with pytest.raises(RunFolderError, match="components exists"):
        train_t2i_model(cfg, run, show_progress=False)
    claim_run_dir(run, resume=False, overwrite=True)
    assert not (run / "components").exists() and not (run / "vae").exists()


def test_a_saved_config_keeps_the_bases_prediction_type(shapes: Path, tmp_path: Path) -> None:
    """A resumed run reads its config back from RUN/config.yaml: the base's prediction type must survive that."""
    from sdpipe.train.t2i import training_scheduler

    cfg = _config(shapes, tmp_path / "cache")
    again = load_config(None, [], base=cfg.model_dump(mode="json"))
    for c in (cfg, again):
        assert training_scheduler(c, {"prediction_type": "epsilon"}).config["prediction_type"] == "epsilon"
    chosen = load_config(None, ["diffusion.prediction_type=v_prediction"], base=again.model_dump(mode="json"))
    assert training_scheduler(chosen, {"prediction_type": "epsilon"}).config["prediction_type"] == "v_prediction"
    assert load_config(None, []).diffusion.prediction_type == "v_prediction"  # pixel models: as before
