"""`train.train_text_encoder`: the text encoder(s) train beside the UNet (a LoRA for method lora, every weight
for full and scratch), uncached; the embeddings they train on are diffusers' own, resume stays bitwise, the
LoRA file carries kohya's text-encoder keys that vanilla diffusers loads to sdpipe's images, and a full run
saves its trained encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import test_t2i_train
from sdpipe.data import open_split
from sdpipe.models.pipelines import load_pipeline
from sdpipe.train.losses import TokenCond
from sdpipe.train.t2i_run import LORA_FILE, train_text_to_image
from sdpipe.train.t2i_text import TextAndUNet, Tokens, text_encoders
from test_t2i_train import Interrupt, _config, _stop_at, _weights, _write_images

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")


captioned = test_t2i_train.captioned  # the captioned set's fixture, shared (test_t2i_precision takes it from here)

PROMPTS = ["a red square", "", "a blue square left of a white square"]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_embeddings_are_diffusers_encode_prompt(kind: str, sd1_pipeline: Path, sdxl_pipeline: Path) -> None:
    pipe = load_pipeline(sd1_pipeline if kind == "sd1" else sdxl_pipeline).pipe
    joint = TextAndUNet(pipe.unet, text_encoders(pipe))
    time_ids = torch.zeros(len(PROMPTS), 6) if kind == "sdxl" else None
    with torch.no_grad():
        got = joint.encode(TokenCond(Tokens(pipe)(PROMPTS), time_ids))
        want = pipe.encode_prompt(
            prompt=PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert torch.equal(got.embeds, want[0])
    if kind == "sdxl":
        assert got.added is not None and torch.equal(got.added["text_embeds"], want[2])


@pytest.mark.parametrize("method", ["lora", "full", "scratch"])
def test_resume_is_bitwise_with_the_text_encoder_training(
    method: str, captioned: tuple[Path, Path], sd1_pipeline: Path, tmp_path: Path
) -> None:
    cfg = _config(
        *captioned, sd1_pipeline, tmp_path / "cache", f"train.method={method}", "train.train_text_encoder=true"
    )
    data = open_split(cfg.data)
    whole = train_text_to_image(cfg, data, tmp_path / "whole")
    with pytest.raises(Interrupt):
        train_text_to_image(cfg, data, tmp_path / "cut", progress=_stop_at(5))
    resumed = train_text_to_image(cfg, data, tmp_path / "cut", resume=True)
    a, b = _weights(whole.outcome.module), _weights(resumed.outcome.module)
    assert a.keys() == b.keys() and any(k.startswith("text_encoders.0.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.caches["text"] == {"skipped": "train.train_text_encoder: text-encoder outputs are not cached"}
    base = load_pipeline(sd1_pipeline).pipe.text_encoder.state_dict()
    trained = whole.outcome.module.text_encoders[0].state_dict()
    if method != "lora":  # the encoder's own weights moved, and the saved pipeline holds them
        assert any(not torch.equal(base[k], trained[k]) for k in base)
        saved = load_pipeline(whole.model_dir).pipe.text_encoder.state_dict()
        assert all(torch.equal(saved[k], trained[k]) for k in saved)
    else:  # only the LoRA trained: the base weights under it are untouched
        lora = {k for k in trained if "lora_" in k}
        assert lora and all(
            torch.equal(base[k.replace(".base_layer", "")], trained[k]) for k in trained if k not in lora
        )
        assert any(trained[k].abs().max() > 0 for k in lora if "lora_B" in k)  # B starts at zero


def test_text_encoder_lora_file_loads_in_vanilla_diffusers_and_matches_sdpipe(
    captioned: tuple[Path, Path], sd1_pipeline: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open

    from sdpipe.models.lora import lora_ref
    from test_lora import ours, vanilla

    cfg = _config(
        *captioned, sd1_pipeline, tmp_path / "cache", "train.method=lora", "train.train_text_encoder=true",
        "train.learning_rate=1e-2",
    )  # fmt: skip
    train_text_to_image(cfg, open_split(cfg.data), tmp_path / "run")
    lora = tmp_path / "run" / LORA_FILE
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te_text_model_") for k in keys), keys[:5]
    assert not any(k.startswith("lora_te1_") for k in keys)  # SD 1's single encoder: the web UIs' lora_te_

    reference = load_pipeline(sd1_pipeline)
    reference.pipe.load_lora_weights(str(lora))
    assert reference.pipe.get_list_adapters().keys() >= {"unet", "text_encoder"}
    want = vanilla(reference)
    got = ours(load_pipeline(sd1_pipeline), (lora_ref(lora),))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_sdxl_text_encoder_lora_writes_both_encoders(
    captioned: tuple[Path, Path], sdxl_pipeline: Path, tmp_path: Path
) -> None:
    import diffusers

    cfg = _config(
        *captioned, sdxl_pipeline, tmp_path / "cache", "train.method=lora", "train.train_text_encoder=true",
        "train.steps=2",
    )  # fmt: skip
    train_text_to_image(cfg, open_split(cfg.data), tmp_path / "run")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "run" / LORA_FILE))
    assert pipe.get_list_adapters().keys() >= {"unet", "text_encoder", "text_encoder_2"}


def test_lora_dropout_acts_in_every_step_after_validation(
    sd1_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base loaded from disk is in eval mode; validation switches the module to eval and back to the mode it
    found. Unless the trainer puts the module in train mode first, the LoRA's dropout stops after the first
    validation."""
    from sdpipe.config import load_config
    from sdpipe.data.validate import validate
    from sdpipe.train.t2i import TextToImageTask

    source = _write_images(tmp_path / "images")
    validate(str(source), tmp_path / "validated", load_config(None, ["data.validation_fraction=0.3"]).data)
    extra = ("train.method=lora", "train.lora_dropout=0.5", "data.validation_fraction=0.3", "train.validate_every=1",
             "train.steps=3")  # fmt: skip
    cfg = _config(source, tmp_path / "validated", sd1_pipeline, tmp_path / "cache", *extra)
    modes: list[bool] = []
    loss = TextToImageTask.loss

    def recording(self: TextToImageTask, objective: object, model: torch.nn.Module, batch: object) -> object:
        modes.extend(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))
        return loss(self, objective, model, batch)

    monkeypatch.setattr(TextToImageTask, "loss", recording)
    train_text_to_image(
        cfg, open_split(cfg.data, "train"), tmp_path / "run", validation=open_split(cfg.data, "validation")
    )
    assert modes and all(modes)
