"""`identify` and `sdpipe models inspect` on hand-made files: web-UI checkpoints of each architecture (real SD key
names, with the shapes diffusers reads to tell them apart), tiny diffusers pipeline folders, a pixel-class model,
and every refusal: pickles (by name and by first bytes, never unpickled), truncated files, a LoRA or a VAE given as
a model, unknown keys. Plus the hashes and their cache."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import random_model
from sdpipe.models import files as files_module
from sdpipe.models import hashes
from sdpipe.models.cli import app
from sdpipe.models.files import ModelFileError, identify, identify_lora, read_safetensors_header

UNET = "model.diffusion_model."
TO_K = UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"  # (320, context width)
CONV_IN = UNET + "input_blocks.0.0.weight"  # (320, in channels, 3, 3)
V1_MARKER = UNET + "output_blocks.11.0.skip_connection.weight"
CLIP_L = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
OPEN_CLIP = "cond_stage_model.model.token_embedding.weight"
XL_CLIP_L = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
XL_BIG_G = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
VAE = "first_stage_model.decoder.conv_out.weight"


def zeros(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def checkpoint_tensors(architecture: str) -> dict[str, torch.Tensor]:
    """The keys (and shapes) of a web-UI checkpoint that diffusers' infer_diffusers_model_type looks at."""
    in_channels = 9 if architecture.endswith("inpaint") else 4
    base = architecture.removesuffix("-inpaint")
    t = {CONV_IN: zeros(320, in_channels, 3, 3), VAE: zeros(3, 8, 3, 3, dtype=torch.float32)}
    if base == "sd1":
        t |= {TO_K: zeros(320, 768), V1_MARKER: zeros(320, 640, 1, 1), CLIP_L: zeros(77, 768)}
    elif base == "sd2":
        t |= {TO_K: zeros(320, 1024), V1_MARKER: zeros(320, 640, 1, 1), OPEN_CLIP: zeros(16, 1024)}
    elif base == "sdxl":  # no attention at the first level, so no input_blocks.2.1
        t |= {XL_CLIP_L: zeros(77, 768), XL_BIG_G: zeros(1280)}
    else:  # the XL refiner: OpenCLIP bigG alone, as embedder 0
        t |= {"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": zeros(1280)}
    return t


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


class LeavesAMark:
    """Unpickling this creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """pickle.load/loads/Unpickler, torch.load and safetensors' tensor loaders record any call and raise: the
    test then checks the record is empty (a raise alone could be caught and turned into a refusal)."""
    import safetensors
    import safetensors.torch

    calls: list[str] = []

    def refuse(name: str):  # noqa: ANN202
        def called(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return called

    for module, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (safetensors, "safe_open"),
        (safetensors.torch, "load_file"),
        (safetensors.torch, "load"),
    ]:
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    yield calls
    assert calls == []


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDPIPE_CACHE_DIR", str(tmp_path / "cache"))


# --- single-file checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "prediction"),
    [
        ("sd1", "epsilon"),
        ("sd2", "v_prediction"),
        ("sdxl", "epsilon"),
        ("sd1-inpaint", "epsilon"),
        ("sd2-inpaint", "epsilon"),
        ("sdxl-inpaint", "epsilon"),
        ("sdxl-refiner", "epsilon"),
    ],
)
def test_single_file_architectures(tmp_path: Path, architecture: str, prediction: str, no_unpickling: list) -> None:
    tensors = checkpoint_tensors(architecture)
    path = write(tmp_path / "model.safetensors", tensors)
    found = identify(path)
    assert (found.kind, found.architecture, found.prediction_type) == ("sd-single-file", architecture, prediction)
    assert found.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert found.short_hash == found.sha256[:10] and found.size_bytes == path.stat().st_size
    unet = found.component("unet")
    assert unet is not None and unet.class_name == "UNet2DConditionModel" and unet.dtype == "float16"
    assert unet.parameters == sum(t.numel() for k, t in tensors.items() if k.startswith(UNET))
    vae = found.component("vae")
    assert vae is not None and (vae.dtype, vae.parameters) == ("float32", 3 * 8 * 9)
    expected_encoders = {"sdxl": {"text_encoder", "text_encoder_2"}, "sdxl-refiner": {"text_encoder_2"}}.get(
        architecture.removesuffix("-inpaint"), {"text_encoder"}
    )
    assert {c.name for c in found.components} == {"unet", "vae"} | expected_encoders
    assigned = "v_prediction assumed" in " ".join(found.notes)
    assert assigned == (architecture == "sd2")


def test_metadata_and_v_pred_key_say_the_prediction_type(tmp_path: Path) -> None:
    spec = write(tmp_path / "a.safetensors", checkpoint_tensors("sd2"), {"modelspec.prediction_type": "epsilon"})
    assert identify(spec).prediction_type == "epsilon"
    base = write(
        tmp_path / "c.safetensors", checkpoint_tensors("sd2"), {"modelspec.architecture": "stable-diffusion-v2-512"}
    )
    assert identify(base).prediction_type == "epsilon"
    vpred = write(tmp_path / "b.safetensors", checkpoint_tensors("sdxl") | {"v_pred": zeros(0)})
    assert identify(vpred).prediction_type == "v_prediction"


def test_only_the_header_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_unpickling: list) -> None:
    """With hashing off, identify reads the 8-byte length and the JSON header, not one byte of tensor data."""
    path = write(tmp_path / "model.safetensors", checkpoint_tensors("sd1"))
    header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    read: list[int] = []
    real_open = open

    class Counted:
        def __init__(self, f: object) -> None:
            self.f = f

        def __enter__(self) -> Counted:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()  # type: ignore[attr-defined]

        def read(self, n: int = -1) -> bytes:
            data = self.f.read(n)  # type: ignore[attr-defined]
            read.append(len(data))
            return data

    monkeypatch.setattr(files_module, "open", lambda *a, **k: Counted(real_open(*a, **k)), raising=False)
    assert identify(path, with_hash=False).architecture == "sd1"
    assert 0 < sum(read) <= 2 * header_end  # the first bytes (pickle check) and then the header


def test_a_safetensors_header_length_starting_with_0x80_is_not_a_pickle(tmp_path: Path) -> None:
    """A header of 896 bytes has the length bytes 80 03 ..., which is also how a protocol-2 pickle starts."""
    tensors = checkpoint_tensors("sd1")
    path = write(tmp_path / "model.safetensors", tensors)
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header).encode()
    assert len(text) <= 0x380
    path.write_bytes(struct.pack("<Q", 0x380) + text.ljust(0x380) + raw[8 + length :])
    assert path.read_bytes()[:2] == b"\x80\x03"
    assert identify(path).architecture == "sd1"


# --- pickles ----------------------------------------------------------------------------------------------------


def pickles(folder: Path, marker: Path) -> list[Path]:
    """Pickles whose unpickling creates `marker`, by name and under safetensors/neutral names (by magic)."""
    folder.mkdir(parents=True, exist_ok=True)
    obj = {"state_dict": {"w": torch.zeros(2)}, "x": LeavesAMark(marker)}
    paths = []
    for name in ["model.ckpt", "model.pt", "model.pth", "pytorch_model.bin", "model.pkl"]:
        torch.save(obj, folder / name)
        paths.append(folder / name)
    torch.save(obj, folder / "zip.safetensors")  # zip magic under a safetensors name
    torch.save(obj, folder / "legacy.safetensors", _use_new_zipfile_serialization=False)  # \x80\x02
    (folder / "plain").write_bytes(pickle.dumps(LeavesAMark(marker), protocol=4))  # \x80\x04, no suffix
    return [*paths, folder / "zip.safetensors", folder / "legacy.safetensors", folder / "plain"]


def test_pickles_are_refused_unread(tmp_path: Path, no_unpickling: list) -> None:
    marker = tmp_path / "UNPICKLED"
    for path in pickles(tmp_path / "p", marker):
        with pytest.raises(ModelFileError) as err:
            identify(path)
        message = str(err.value)
        assert f"{path} is a pickle checkpoint" in message, message
        assert "weights_only=True" in message and "save_file" in message and "trust" in message
        evidence = "by its name" if path.suffix in files_module.PICKLE_SUFFIXES else "first bytes"
        assert evidence in message
    assert not marker.exists()


def test_the_marker_works(tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    pickle.loads((pickles(tmp_path / "p", marker)[-1]).read_bytes())  # what identify must never do
    assert marker.exists()


def test_the_conversion_snippet_works(tmp_path: Path) -> None:
    """The command in the refusal turns a (trusted) ckpt into a safetensors file identify accepts."""
    torch.save({"state_dict": checkpoint_tensors("sd1")}, tmp_path / "m.ckpt")
    with pytest.raises(ModelFileError) as err:
        identify(tmp_path / "m.ckpt")
    snippet = str(err.value).split('python -c "', 1)[1].rstrip('"')
    exec(snippet, {})  # noqa: S102
    assert identify(tmp_path / "m.safetensors").architecture == "sd1"


# --- truncated and other non-model files ------------------------------------------------------------------------


def test_a_truncated_file_names_both_sizes(tmp_path: Path, no_unpickling: list) -> None:
    path = write(tmp_path / "model.safetensors", checkpoint_tensors("sd1"))
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(ModelFileError, match="truncated") as err:
        identify(path)
    assert f"ends at byte {len(raw)}" in str(err.value) and f"file is {len(raw) - 100} bytes" in str(err.value)
    length = int.from_bytes(raw[:8], "little")
    path.write_bytes(raw[: 8 + length // 2])  # cut inside the JSON header
    with pytest.raises(ModelFileError, match="truncated") as err:
        identify(path)
    assert f"at least {8 + length} bytes" in str(err.value) and f"it is {8 + length // 2} bytes" in str(err.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "too short"),
        (b'{"_class_name": "UNet2DConditionModel"}', "not a safetensors file"),
        (struct.pack("<Q", 5) + b"{oops", "does not parse"),
        (struct.pack("<Q", 2) + b"[]", "not a safetensors file"),
    ],
)
def test_not_safetensors(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(ModelFileError, match=expected):
        identify(tmp_path / "x.safetensors")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such file or folder"):
        identify(tmp_path / "nope.safetensors")


def test_header_is_read_as_written(tmp_path: Path) -> None:
    path = write(tmp_path / "a.safetensors", {"b": zeros(2, 3), "a": zeros(4, dtype=torch.bfloat16)}, {"k": "v"})
    tensors, metadata = read_safetensors_header(path)
    assert metadata == {"k": "v"}
    assert (tensors["b"].dtype, tensors["b"].shape, tensors["a"].dtype) == ("F16", (2, 3), "BF16")
    lengths = sorted(t.data_offsets[1] - t.data_offsets[0] for t in tensors.values())
    assert lengths == [8, 12]


def test_a_vae_alone_is_refused(tmp_path: Path, no_unpickling: list) -> None:
    keys = ["encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight"]
    path = write(tmp_path / "vae.safetensors", {k: zeros(2) for k in keys})
    with pytest.raises(ModelFileError, match="is a VAE alone") as err:
        identify(path)
    assert "--vae" in str(err.value) and "model.diffusion_model" in str(err.value)


def test_a_vae_folder_is_refused(tmp_path: Path) -> None:
    tiny_vae().save_pretrained(tmp_path / "vae")
    with pytest.raises(ModelFileError, match="is a VAE alone .*AutoencoderKL"):
        identify(tmp_path / "vae")


def test_unknown_keys_are_refused_with_their_prefixes(tmp_path: Path) -> None:
    path = write(tmp_path / "x.safetensors", {"foo.bar.baz": zeros(2), "qux": zeros(1)})
    with pytest.raises(ModelFileError, match=r"keys start foo\.bar\.\*, qux; expected a Stable Diffusion"):
        identify(path)


def test_an_unsupported_diffusers_type_is_refused(tmp_path: Path) -> None:
    sd3 = UNET + "joint_blocks.0.context_block.adaLN_modulation.1.bias"
    path = write(tmp_path / "sd3.safetensors", {sd3: zeros(9216), UNET + "pos_embed": zeros(1, 36864, 1)})
    with pytest.raises(ModelFileError, match="'sd3' checkpoint"):
        identify(path)


# --- LoRAs ------------------------------------------------------------------------------------------------------


def kohya_sd1_lora(rank: int = 4) -> dict[str, torch.Tensor]:
    block = "lora_unet_down_blocks_0_attentions_0_"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    return {
        f"{block}proj_in.lora_down.weight": zeros(rank, 320, 1, 1),
        f"{block}proj_in.lora_up.weight": zeros(320, rank, 1, 1),
        f"{block}proj_in.alpha": torch.tensor(4.0),
        f"{block}transformer_blocks_0_attn2_to_k.lora_down.weight": zeros(rank, 768),
        f"{block}transformer_blocks_0_attn2_to_k.lora_up.weight": zeros(320, rank),
        f"{te}.lora_down.weight": zeros(rank, 768),
        f"{te}.lora_up.weight": zeros(768, rank),
    }


def test_a_lora_given_as_a_model_is_refused(tmp_path: Path, no_unpickling: list) -> None:
    path = write(tmp_path / "style.safetensors", kohya_sd1_lora())
    with pytest.raises(ModelFileError, match="pass it with --lora") as err:
        identify(path)
    message = str(err.value)
    assert "is a LoRA (kohya keys lora_unet_*, lora_te_*; rank 4; looks made for sd1)" in message


def test_a_lora_is_identified_as_one(tmp_path: Path) -> None:
    tensors = kohya_sd1_lora()
    path = write(tmp_path / "style.safetensors", tensors, {"ss_network_alpha": "4"})
    raw = path.read_bytes()
    after_header = raw[8 + int.from_bytes(raw[:8], "little") :]
    for found in (identify_lora(path), identify(path, allow_lora=True)):
        assert (found.kind, found.architecture, found.prediction_type) == ("lora", "sd1", None)
        assert found.short_hash == hashlib.sha256(after_header).hexdigest()[:12] == hashes.lora_hash(path)
        assert [c.name for c in found.components] == ["unet", "text_encoder"]
        assert "network alpha 4 (kohya metadata)" in found.notes
    # the web UI's LoRA hash skips the header, so other metadata leaves it unchanged (the file hash changes)
    other = write(tmp_path / "renamed.safetensors", tensors, {"ss_network_alpha": "4", "ss_output_name": "x"})
    assert hashes.lora_hash(other) == hashes.lora_hash(path) and hashes.file_sha256(other) != hashes.file_sha256(path)


@pytest.mark.parametrize(
    ("tensors", "architecture", "rank"),
    [
        (
            {
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight": zeros(8, 640),
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": zeros(8, 1280),
            },
            "sdxl",
            "rank 8",
        ),
        (
            {
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": zeros(16, 1024),
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": zeros(320, 16),
            },
            "sd2",
            "rank 16",
        ),
        ({"lora_unet_mid_block_proj_in.lora_down.weight": zeros(2, 1280)}, "unknown", "rank 2"),
    ],
)
def test_lora_formats_and_architectures(tmp_path: Path, tensors: dict, architecture: str, rank: str) -> None:
    found = identify_lora(write(tmp_path / "l.safetensors", tensors))
    assert found.architecture == architecture and rank in found.notes


def test_identify_lora_refuses_a_model(tmp_path: Path) -> None:
    path = write(tmp_path / "m.safetensors", checkpoint_tensors("sd1"))
    with pytest.raises(ModelFileError, match="sd1 sd-single-file model, not a LoRA"):
        identify_lora(path)


# --- diffusers pipeline folders ---------------------------------------------------------------------------------


def tiny_vae():  # noqa: ANN201
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )


def tiny_unet(**more: object):  # noqa: ANN201
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    settings: dict = dict(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    return UNet2DConditionModel(**(settings | more))


def tiny_text_encoder(projection: bool = False):  # noqa: ANN201
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=8, intermediate_size=16,
        num_attention_heads=2, num_hidden_layers=2, vocab_size=1000, projection_dim=8,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def byte_chars() -> list[str]:
    """GPT-2's 256 byte-to-unicode characters, in its order: printable bytes as themselves, the rest from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    codes = dict(zip(printable, printable, strict=True)) | {b: 256 + i for i, b in enumerate(rest)}
    return [chr(codes[b]) for b in [*printable, *rest]]


def tiny_tokenizer(folder: Path):  # noqa: ANN201
    """A byte-level CLIP tokenizer made offline (514 ids; merges.txt without merges)."""
    from transformers import CLIPTokenizer

    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    assert len(tokenizer) == 514  # transformers 5 ignores vocab_file=/merges_file= and would give 2-3 tokens
    return tokenizer


def save_pipeline(out: Path, kind: str) -> dict[str, torch.nn.Module]:
    """A tiny random SD1 / SD2-v / SDXL pipeline saved as safetensors, UNet in float16; returns its models."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        prediction_type="v_prediction" if kind == "sd2" else "epsilon",
    )  # fmt: skip
    tokenizer = tiny_tokenizer(out.parent / f"{out.name}-tok")
    models: dict[str, torch.nn.Module] = {"vae": tiny_vae(), "text_encoder": tiny_text_encoder()}
    if kind == "sdxl":
        models["text_encoder_2"] = tiny_text_encoder(projection=True)
        models["unet"] = tiny_unet(
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=56, cross_attention_dim=16,
        ).half()  # fmt: skip
        pipe = StableDiffusionXLPipeline(
            tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler, add_watermarker=False, **models
        )
    else:
        more = {"attention_head_dim": (2, 4), "use_linear_projection": True} if kind == "sd2" else {}
        models["unet"] = tiny_unet(**more).half()
        pipe = StableDiffusionPipeline(
            tokenizer=tokenizer, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **models,
        )  # fmt: skip
    pipe.save_pretrained(out, safe_serialization=True)
    return models


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.nn.Module]]]:
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: (root / kind, save_pipeline(root / kind, kind)) for kind in ("sd1", "sd2", "sdxl")}


@pytest.mark.parametrize(
    ("kind", "architecture", "prediction", "cls"),
    [
        ("sd1", "sd1", "epsilon", "StableDiffusionPipeline"),
        ("sd2", "sd2", "v_prediction", "StableDiffusionPipeline"),
        ("sdxl", "sdxl", "epsilon", "StableDiffusionXLPipeline"),
    ],
)
def test_pipeline_folders(pipelines: dict, kind: str, architecture: str, prediction: str, cls: str) -> None:
    folder, models = pipelines[kind]
    found = identify(folder)
    assert (found.kind, found.architecture, found.prediction_type) == ("sd-pipeline", architecture, prediction)
    names = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert {c.name for c in found.components} == names | (
        {"text_encoder_2", "tokenizer_2"} if kind == "sdxl" else set()
    )
    for name, model in models.items():
        info = found.component(name)
        assert info is not None and info.class_name == type(model).__name__
        assert info.parameters == sum(p.numel() for p in model.parameters()), name
        assert info.dtype == ("float16" if name == "unet" else "float32")
    scheduler = found.component("scheduler")
    assert scheduler is not None and (scheduler.class_name, scheduler.parameters) == ("DDIMScheduler", 0)
    if kind != "sdxl":  # the tiny UNets' cross-attention widths are not SD's: the note says what was assumed
        assert any(f"architecture {architecture} assumed" in n for n in found.notes), found.notes
    assert found.short_hash == found.sha256[:10]  # type: ignore[index]
    assert found.size_bytes > sum(p.numel() for p in models["text_encoder"].parameters()) * 4


def test_pipeline_hash_is_stable_and_follows_the_weights(pipelines: dict, tmp_path: Path) -> None:
    folder, _ = pipelines["sd1"]
    copy = shutil.copytree(folder, tmp_path / "copy")
    first = identify(folder).sha256
    assert identify(folder).sha256 == first and identify(copy).sha256 == first  # content, not location
    vae = tiny_vae()
    with torch.no_grad():
        next(iter(vae.parameters())).add_(1.0)
    vae.save_pretrained(copy / "vae", safe_serialization=True)
    assert identify(copy).sha256 != first


def test_variant_weights_are_counted_once(pipelines: dict, tmp_path: Path) -> None:
    folder = shutil.copytree(pipelines["sd1"][0], tmp_path / "variants")
    expected = identify(folder).component("vae")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    shutil.copy(weights, folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    found = identify(folder)
    assert found.component("vae") == expected and "vae: also has fp16 variant weights, not counted" in found.notes
    weights.unlink()
    found = identify(folder)
    assert found.component("vae") == expected
    assert "vae: only variant 'fp16' weights, which load with variant='fp16'" in found.notes


def test_an_inpainting_pipeline(pipelines: dict, tmp_path: Path) -> None:
    folder = shutil.copytree(pipelines["sd1"][0], tmp_path / "inpaint")
    tiny_unet(in_channels=9).save_pretrained(folder / "unet", safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionInpaintPipeline"}))
    assert identify(folder).architecture == "sd1-inpaint"


def test_a_pipeline_component_with_only_pickle_weights_is_refused(
    pipelines: dict, tmp_path: Path, no_unpickling: list
) -> None:
    folder = shutil.copytree(pipelines["sd1"][0], tmp_path / "bin")
    marker = tmp_path / "UNPICKLED"
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"w": LeavesAMark(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFileError, match="component unet has only pickle weights") as err:
        identify(folder)
    assert "diffusion_pytorch_model.bin is a pickle checkpoint" in str(err.value)
    assert not marker.exists()


def test_a_pickled_safety_checker_is_only_noted(pipelines: dict, tmp_path: Path, no_unpickling: list) -> None:
    """sdpipe loads pipelines with safety_checker=None, so a pickled or missing one is not a reason to refuse."""
    folder = shutil.copytree(pipelines["sd1"][0], tmp_path / "checker")
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "feature_extractor": ["a", "B"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, folder / "safety_checker" / "pytorch_model.bin")
    found = identify(folder)
    assert found.component("safety_checker") is None and found.component("feature_extractor") is None
    assert any("component safety_checker has only pickle weights" in n for n in found.notes)
    assert any(n.startswith("feature_extractor is listed in model_index.json but has no folder") for n in found.notes)


def test_other_pipeline_classes_and_missing_parts_are_refused(pipelines: dict, tmp_path: Path) -> None:
    folder = shutil.copytree(pipelines["sd1"][0], tmp_path / "other")
    assert [c.name for c in identify(folder).components] == ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelFileError, match="is a diffusers FluxPipeline folder: expected a Stable Diffusion"):
        identify(folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelFileError, match=r"the vae/ folder is missing \(model_index.json lists vae as Autoenc"):
        identify(folder)
    with pytest.raises(ModelFileError, match="one diffusers component .UNet2DConditionModel."):
        identify(folder / "unet")
    with pytest.raises(ModelFileError, match="without model_index.json or sdpipe.json"):
        identify(folder / "scheduler")


# --- pixel-class ------------------------------------------------------------------------------------------------


def test_pixel_class_model(tmp_path: Path) -> None:
    from sdpipe.models import load_model

    path = random_model(tmp_path / "digits")
    found = identify(path)
    loaded = load_model(path)
    assert (found.kind, found.architecture) == ("pixel-class", "unet2d")
    assert found.short_hash == loaded.meta.weights_hash
    assert found.prediction_type == loaded.scheduler_config.get("prediction_type", "epsilon")
    unet = found.component("unet")
    assert unet is not None and unet.parameters == sum(p.numel() for p in loaded.unet.parameters())
    assert (unet.class_name, unet.dtype) == ("UNet2DModel", "float32")
    assert found.sha256 == identify(shutil.copytree(path, tmp_path / "copy")).sha256


# --- the command ------------------------------------------------------------------------------------------------


def test_inspect_prints_the_identity(pipelines: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(pipelines["sdxl"][0])])
    assert result.exit_code == 0, result.output
    for field in ("sd-pipeline", "sdxl", "epsilon", "text_encoder_2", "CLIPTextModelWithProjection", "float16"):
        assert field in result.stdout
    assert "sha256" in result.stdout and "KiB" in result.stdout
    lora = write(tmp_path / "l.safetensors", kohya_sd1_lora())
    result = runner.invoke(app, ["inspect", str(lora), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["kind"], data["short_hash"]) == ("lora", hashes.lora_hash(lora))
    assert data["components"][0]["name"] == "unet" and data["path"] == str(lora)


def test_inspect_errors_are_one_line(tmp_path: Path, no_unpickling: list) -> None:
    marker = tmp_path / "UNPICKLED"
    torch.save({"w": LeavesAMark(marker)}, tmp_path / "model.ckpt")
    for path in (tmp_path / "model.ckpt", tmp_path / "missing"):
        result = CliRunner().invoke(app, ["inspect", str(path)])
        assert result.exit_code == 2
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.output
    assert not marker.exists()


# --- hashes -----------------------------------------------------------------------------------------------------


@pytest.fixture
def digests(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every full read of a file for hashing, in order."""
    seen: list[Path] = []
    real = hashes._digest_file

    def counted(path: Path, start: int) -> str:
        seen.append(path)
        return real(path, start)

    monkeypatch.setattr(hashes, "_digest_file", counted)
    return seen


def test_hashes_are_cached_until_the_file_changes(tmp_path: Path, digests: list[Path]) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x" * (3 << 20))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashes.file_sha256(path) == expected and len(digests) == 1
    assert hashes.file_sha256(path) == expected and hashes.webui_model_hash(path) == expected[:10]
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    assert hashes.file_sha256(link) == expected and len(digests) == 1  # keyed by the real path
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same bytes, new mtime: hashed again
    assert hashes.file_sha256(path) == expected and len(digests) == 2
    path.write_bytes(b"y" * (3 << 20))
    assert hashes.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() and len(digests) == 3


def test_a_corrupt_cache_is_ignored_and_replaced(tmp_path: Path, digests: list[Path]) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * (1 << 20))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    cache = hashes.cache_dir() / hashes.CACHE_NAME
    cache.parent.mkdir(parents=True, exist_ok=True)
    for junk in ("{not json", "[]", json.dumps({"version": 1, "files": {os.path.realpath(path): "oops"}})):
        cache.write_text(junk)
        assert hashes.file_sha256(path) == expected
    assert len(digests) == 3
    assert json.loads(cache.read_text())["files"][os.path.realpath(path)]["sha256"] == expected
    hashes.file_sha256(path)
    assert len(digests) == 3


def test_small_files_are_not_cached(tmp_path: Path, digests: list[Path]) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert hashes.file_sha256(tmp_path / "config.json") == hashes.file_sha256(tmp_path / "config.json")
    assert len(digests) == 2 and not (hashes.cache_dir() / hashes.CACHE_NAME).exists()


def test_an_unwritable_cache_costs_only_a_rehash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("SDPIPE_CACHE_DIR", str(tmp_path / "blocked"))
    (tmp_path / "w").write_bytes(b"abc")
    assert hashes.file_sha256(tmp_path / "w") == hashlib.sha256(b"abc").hexdigest()


def test_folder_hash_is_its_documented_definition(tmp_path: Path) -> None:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "x").write_bytes(b"1")
    (tmp_path / "a" / "y").write_bytes(b"2")
    (tmp_path / "a" / ".hidden").write_bytes(b"3")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z").write_bytes(b"4")

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    a = sha(f"sub/x {sha(b'1')}\ny {sha(b'2')}\n".encode())
    b = sha(f"z {sha(b'4')}\n".encode())
    assert hashes.folder_sha256(tmp_path, ["b", "a"]) == sha(f"a={a}\nb={b}\n".encode())
