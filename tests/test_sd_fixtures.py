"""The offline tiny SD fixtures themselves: they load with vanilla diffusers, sample, and export exactly.

This module imports its fixtures the way other SD test modules will (`from sd_fixtures import ...`), so it also
checks that fixtures defined in `sd_fixtures.py` work when imported into a test module.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from sd_fixtures import (  # the fixtures themselves come through conftest.py
    BOS_ID,
    EOS_ID,
    PIPELINE_CLASSES,
    byte_tokenizer,
    no_network,
    single_file_folders,
    torch_threads,
)

FIXTURES = {
    "sd1": "sd1_pipeline",
    "sd2-v": "sd2v_pipeline",
    "sdxl": "sdxl_pipeline",
    "sd1-inpaint": "sd1_inpaint_pipeline",
    "sdxl-inpaint": "sdxl_inpaint_pipeline",
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models on a shared CPU: one thread avoids OpenMP waits (see `sd_fixtures.torch_threads`)."""
    with torch_threads(1):
        yield


def _generate(pipe, kind: str, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Two steps of the vanilla pipeline with a per-image CPU generator, as sdpipe's equivalence tests run it."""
    extra = {}
    if kind.endswith("inpaint"):
        g = torch.Generator("cpu").manual_seed(123)
        mask = torch.zeros(1, 1, size, size)
        mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0  # white = repaint
        extra = {"image": torch.rand(1, 3, size, size, generator=g), "mask_image": mask}
    return pipe(
        "a photo of a cat",
        negative_prompt="blurry",
        num_inference_steps=2,
        height=size,
        width=size,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="pt",
        **extra,
    ).images


def _load(kind: str, folder: Path):
    import diffusers

    pipe = getattr(diffusers, PIPELINE_CLASSES[kind]).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_byte_tokenizer(tmp_path: Path) -> None:
    tok = byte_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == len(tok) == 514
    assert (tmp_path / "merges.txt").read_text() == "#version: 0.2\n"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    assert tok.model_max_length == 77
    # no merges: a word is its characters, the last one carrying the end-of-word mark
    ids = tok("A cat").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "c", "a", "t</w>", "<|endoftext|>"]
    padded = tok("a cat", padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(padded) == 77 and padded[5:] == [EOS_ID] * 72
    assert byte_tokenizer(tmp_path / "two", pad_token="!").pad_token_id == 0  # SD2 / SDXL tokenizer_2 style


@pytest.mark.parametrize("kind", list(FIXTURES))
@pytest.mark.usefixtures("offline")
def test_tiny_pipeline_loads_offline_and_samples(kind: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(FIXTURES[kind])
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASSES[kind]
    assert not list(folder.rglob("*.bin")), "weights must be safetensors only"
    pipe = _load(kind, folder)
    assert pipe.vae_scale_factor == 2 and pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer("a").input_ids == [BOS_ID, pipe.tokenizer.convert_tokens_to_ids("a</w>"), EOS_ID]
    assert pipe.unet.config.in_channels == (9 if kind.endswith("inpaint") else 4)
    expected_prediction = "v_prediction" if kind == "sd2-v" else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected_prediction
    assert pipe.scheduler.config.steps_offset == 1
    if kind.startswith("sdxl"):
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert pipe.unet.config.addition_embed_type == "text_time"
        assert pipe.tokenizer_2.pad_token == "!"
    image = _generate(pipe, kind)
    assert image.shape == (1, 3, 32, 32)
    assert torch.isfinite(image).all()
    assert torch.equal(image, _generate(pipe, kind)), "same generator, same image"


def test_tiny_pipeline_is_deterministic_in_seed(tmp_path: Path) -> None:
    from sd_fixtures import build_pipeline

    a, b, c = (build_pipeline("sd1", seed=s, tokenizer_dir=tmp_path / str(i)) for i, s in enumerate((0, 0, 1)))
    assert all(
        torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_session_builds_are_shared_between_importing_modules(tmp_path_factory: pytest.TempPathFactory) -> None:
    from sd_fixtures import _once

    made: list[Path] = []

    def make(folder: Path) -> Path:
        made.append(folder)
        return folder

    first = _once("shared-check", tmp_path_factory, make)
    assert _once("shared-check", tmp_path_factory, make) == first and made == [first]


def _assert_no_meta(pipe) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
        assert not meta, f"{name}: weights missing from the single file: {meta[:5]}"


@pytest.mark.parametrize("fixture", ["sd1_single_file", "sdxl_single_file"])
@pytest.mark.usefixtures("offline")
def test_single_file_round_trip_is_exact(fixture: str, request: pytest.FixtureRequest) -> None:
    import diffusers
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )
    from safetensors import safe_open

    from sdpipe.models.pipelines import align_weights

    file = request.getfixturevalue(fixture)
    kind = "sdxl" if fixture.startswith("sdxl") else "sd1"
    diffusers_dir, config_dir = single_file_folders(file)
    assert not list(config_dir.rglob("*.safetensors")), "the config folder must hold no weights"
    ref = _load(kind, diffusers_dir)

    with safe_open(str(file), "pt") as f:
        ckpt = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    prefixes = {k.split(".")[0] for k in ckpt}
    assert prefixes == (
        {"model", "first_stage_model", "conditioner"}
        if kind == "sdxl"
        else {"model", "first_stage_model", "cond_stage_model"}
    )
    # the architecture diffusers infers from the header alone, as sdpipe's detection does
    meta = {k: torch.empty(v.shape, device="meta") for k, v in ckpt.items()}
    assert infer_diffusers_model_type(meta) == ("xl_base" if kind == "sdxl" else "v1")
    # diffusers' own LDM -> diffusers converters give back exactly the diffusers state dicts
    for name, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        model = getattr(ref, name)
        back, want = convert(ckpt, model.config), model.state_dict()
        assert back.keys() == want.keys(), name
        assert all(torch.equal(back[k], want[k]) for k in want), name

    cls = getattr(diffusers, PIPELINE_CLASSES[kind])
    # both with their weights at aligned addresses, as sdpipe's loaders leave them (models.pipelines.align_weights):
    # on some CPUs the same weights at other offsets give images 1e-5 apart
    align_weights(ref)
    expected = _generate(ref, kind, seed=7)
    for config in (config_dir, diffusers_dir):
        pipe = cls.from_single_file(str(file), config=str(config), local_files_only=True)
        align_weights(pipe)
        pipe.set_progress_bar_config(disable=True)
        _assert_no_meta(pipe)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(ref, name, None) is None:
                continue
            got, want = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
            assert got.keys() == want.keys(), name
            assert all(torch.equal(got[k], want[k]) for k in want), name
        assert type(pipe.scheduler) is type(ref.scheduler)
        assert (_generate(pipe, kind, seed=7) - expected).abs().max().item() == 0.0


def test_no_network_refuses_and_records() -> None:
    with no_network() as attempts:
        with pytest.raises(OSError, match="network access refused"):
            socket.create_connection(("192.0.2.1", 443), timeout=1)  # TEST-NET-1: never routable
        assert attempts == ["('192.0.2.1', 443)"]
        # loopback stays allowed: in-process servers under test
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
        server.close()
    assert attempts == ["('192.0.2.1', 443)"]
