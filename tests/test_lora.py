"""LoRAs: `--lora FILE[:WEIGHT]` parsing, refusing a LoRA that does not fit its base (naming both), and sdpipe's
adapter switching giving vanilla diffusers' `load_lora_weights` images (to float tolerance) and, with the LoRAs
taken off again, bitwise the images of no LoRA.

The LoRA files are made here from the tiny fixture pipelines with peft, saved with kohya keys as kohya and the
web UIs write them (`lora_unet_*`, `lora_te_text_model_*`, `lora_te2_*`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from sdpipe.conditioning import Conditioning, LoraRef
from sdpipe.models import hashes
from sdpipe.models.lora import (
    LoraError,
    active_text_encoder_loras,
    adapter_name,
    apply_loras,
    check_fits,
    display_name,
    infotext_hashes,
    loaded_adapters,
    lora_ref,
    parse_lora_option,
    split_lora_option,
    touches_text_encoder,
)
from sdpipe.models.pipelines import LoadedPipeline, load_pipeline
from sdpipe.sampling.generate import Row, SampleSpec, generate_items
from sdpipe.sampling.schedulers import pipeline_scheduler

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
PROMPTS = ["a red circle", "two blue squares"]
SPEC = SampleSpec("euler", steps=3, guidance=4.0, micro_batch=1)
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


# --------------------------------------------------------------------------- LoRA files


def _peft_lora(model: Any, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA on `model`'s `targets`, as peft's state dict (`<module>.lora_A.weight`, ...)."""
    from diffusers.loaders import PeftAdapterMixin
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    if isinstance(model, PeftAdapterMixin):  # a diffusers model
        model.add_adapter(config)
        return get_peft_model_state_dict(model)
    # transformers 5.24's add_adapter wants peft >= 0.22, which is not released; peft's own injection works
    inject_adapter_in_model(config, model, "default")
    return get_peft_model_state_dict(model, adapter_name="default")


def _kohya(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """peft state dicts by component -> one kohya-key state dict. convert_state_dict_to_kohya needs the keys
    prefixed with the component ('unet.', 'text_encoder.'); without it the keys get no lora_unet_ prefix at all.
    It writes the first text encoder as lora_te1_ + transformers 5's flattened CLIPTextModel names (no
    text_model.); kohya itself writes lora_te_text_model_* (SD1) and lora_te1_text_model_* (SDXL), which is what
    real files have, so the keys are renamed to those. (CLIPTextModelWithProjection still has text_model.)"""
    from diffusers.utils import convert_state_dict_to_kohya

    prefixed = {f"{component}.{k}": v for component, sd in parts.items() for k, v in sd.items()}
    first = "lora_te1_text_model_" if "text_encoder_2" in parts else "lora_te_text_model_"
    out = {}
    for key, value in convert_state_dict_to_kohya(prefixed).items():
        if key.startswith("lora_te1_") and not key.startswith("lora_te1_text_model_"):
            key = first + key.removeprefix("lora_te1_")
        out[key] = value.detach().contiguous()
    return out


def _save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, sd1_pipeline: Path, sdxl_pipeline: Path) -> dict[str, Path]:
    """sd1-unet, sd1-te (UNet + text encoder), sd1-unet-copy (the same bytes, another name), sdxl-unet, and
    sdxl-te2 (UNet + both text encoders; it records a base hash in its metadata)."""
    import diffusers

    folder = tmp_path_factory.mktemp("loras")
    sd1 = diffusers.StableDiffusionPipeline.from_pretrained(sd1_pipeline, local_files_only=True)
    unet = _peft_lora(sd1.unet, ATTENTION, seed=1)
    te = _peft_lora(sd1.text_encoder, CLIP_ATTENTION, seed=2)
    files = {
        "sd1-unet": _save(_kohya({"unet": unet}), folder / "sd1-unet.safetensors"),
        "sd1-te": _save(_kohya({"unet": unet, "text_encoder": te}), folder / "sd1-te.safetensors"),
    }
    files["sd1-unet-copy"] = Path(shutil.copy(files["sd1-unet"], folder / "copy of sd1-unet.safetensors"))
    xl = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline, local_files_only=True)
    xl_unet = _peft_lora(xl.unet, ATTENTION, seed=3)
    files["sdxl-unet"] = _save(_kohya({"unet": xl_unet}), folder / "sdxl-unet.safetensors")
    te1, te2 = _peft_lora(xl.text_encoder, CLIP_ATTENTION, 4), _peft_lora(xl.text_encoder_2, CLIP_ATTENTION, 5)
    files["sdxl-te2"] = _save(
        _kohya({"unet": xl_unet, "text_encoder": te1, "text_encoder_2": te2}),
        folder / "sdxl-te2.safetensors",
        {"ss_new_sd_model_hash": "ab" * 32, "sdpipe.base_hash": "sha256:0123456789abcdef"},
    )
    return files


@pytest.fixture(scope="module")
def sd1(sd1_pipeline: Path) -> LoadedPipeline:
    """One SD1 pipeline that the switching tests share (each leaves it with no LoRA active)."""
    return load_pipeline(sd1_pipeline)


# --------------------------------------------------------------------------- helpers


def rows(cond: dict[str, Any] | None = None) -> list[Row]:
    return [Row(7 + i, Conditioning(prompt=p, width=32, height=32, **(cond or {}))) for i, p in enumerate(PROMPTS)]


def ours(model: LoadedPipeline, loras: tuple[LoraRef, ...]) -> torch.Tensor:
    """sdpipe's path: the LoRAs in each image's Conditioning, through the one generation path (which applies
    them per micro-batch and keys the text-embedding cache on the active text-encoder LoRAs)."""
    r = rows({"loras": loras})
    images = generate_items(model.parts, r, SPEC)
    return torch.stack([images[x] for x in r]).clamp(-1, 1)


def vanilla(model: LoadedPipeline) -> torch.Tensor:
    """`pipe(...)` itself with one CPU generator per image and the same scheduler (as in test_sd_generate)."""
    pipe, r = model.pipe, rows()
    seeds = [x.seed for x in r]
    pipe.scheduler = pipeline_scheduler(SPEC.sampler, model.scheduler_config, seeds)
    out = pipe(
        prompt=[x.cond.prompt for x in r],
        height=32,
        width=32,
        num_inference_steps=SPEC.steps,
        guidance_scale=SPEC.guidance,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="pt",
    ).images
    return out * 2 - 1


def no_adapters(model: LoadedPipeline) -> bool:
    return not any(model.pipe.get_list_adapters().values())


# --------------------------------------------------------------------------- equivalence with diffusers


@pytest.mark.parametrize(
    ("base", "lora"), [("sd1", "sd1-unet"), ("sd1", "sd1-te"), ("sdxl", "sdxl-unet"), ("sdxl", "sdxl-te2")]
)
def test_equal_to_vanilla_load_lora_weights(
    request: pytest.FixtureRequest, loras: dict[str, Path], base: str, lora: str
) -> None:
    folder = request.getfixturevalue(f"{base}_pipeline")
    plain_model = load_pipeline(folder)
    plain = vanilla(plain_model)

    reference = load_pipeline(folder)
    reference.pipe.load_lora_weights(str(loras[lora]))
    want = vanilla(reference)

    model = load_pipeline(folder)
    model.parts  # noqa: B018  (the parts exist first, as in sdpipe: they give the text encoder its clip-skip alias)
    got = ours(model, (lora_ref(loras[lora]),))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert (want - plain).abs().max() > 1e-2  # the LoRA changes the image
    assert bool(active_text_encoder_loras(model.pipe)) == touches_text_encoder(loras[lora]) == ("te" in lora)


def test_weights_switch_and_loras_off_is_bitwise_no_lora(sd1: LoadedPipeline, loras: dict[str, Path]) -> None:
    full, half = lora_ref(loras["sd1-te"]), lora_ref(loras["sd1-te"], 0.5)
    before = ours(sd1, ())
    at_one = ours(sd1, (full,))
    at_half = ours(sd1, (half,))
    assert (at_one - at_half).abs().max() > 1e-3
    assert (at_half - before).abs().max() > 1e-3
    assert active_text_encoder_loras(sd1.pipe) == ((adapter_name(full.sha256 or ""), 0.5),)
    off = ours(sd1, ())
    assert torch.equal(off, before)
    assert active_text_encoder_loras(sd1.pipe) == ()
    assert torch.equal(ours(sd1, (full,)), at_one)  # on again after disable_lora (set_adapters alone would not)
    both = ours(sd1, (lora_ref(loras["sd1-unet"], 0.5), half))
    assert (both - at_half).abs().max() > 1e-3
    assert torch.equal(ours(sd1, ()), before)


def test_the_same_lora_loads_once(sd1_pipeline: Path, loras: dict[str, Path]) -> None:
    model = load_pipeline(sd1_pipeline)
    calls: list[str] = []
    real = model.pipe.load_lora_weights

    def counted(path: str, **kw: Any) -> None:
        calls.append(path)
        real(path, **kw)

    model.pipe.load_lora_weights = counted
    one, copy = lora_ref(loras["sd1-unet"]), lora_ref(loras["sd1-unet-copy"], 0.7)
    assert one.sha256 == copy.sha256  # the same tensors under another name
    for chosen in ((one,), (copy,), (one,), (), (one,)):
        apply_loras(model.pipe, chosen)
    assert calls == [str(loras["sd1-unet"])]
    assert model.pipe.get_list_adapters() == {"unet": [adapter_name(one.sha256 or "")]}
    with pytest.raises(LoraError, match="listed twice"):
        apply_loras(model.pipe, (one, copy))


def test_a_server_keeps_at_most_max_loaded(sd1_pipeline: Path, loras: dict[str, Path]) -> None:
    """The text-encoder LoRA loaded first is deleted when a second comes, and leaves no trace in the images."""
    model = load_pipeline(sd1_pipeline)
    te, unet = lora_ref(loras["sd1-te"]), lora_ref(loras["sd1-unet"])
    ours(model, (te,))
    apply_loras(model.pipe, (unet,), max_loaded=1)
    assert list(loaded_adapters(model.pipe)) == [adapter_name(unet.sha256 or "")]
    assert adapter_name(te.sha256 or "") not in str(model.pipe.get_list_adapters())
    assert torch.equal(ours(model, (unet,)), ours(load_pipeline(sd1_pipeline), (unet,)))


# --------------------------------------------------------------------------- refusals


def test_an_sdxl_lora_on_sd1_is_refused_naming_both(sd1: LoadedPipeline, loras: dict[str, Path]) -> None:
    with pytest.raises(LoraError) as refused:
        check_fits(sd1, loras["sdxl-te2"])
    text = str(refused.value)
    assert "sdxl-te2.safetensors (made for sdxl" in text  # the LoRA and what it was made for
    assert "sdpipe.base_hash=sha256:0123456789abcdef" in text  # the base it records
    assert f"base {sd1.path}, hash {sd1.hash} (sd1)" in text  # the base it was given
    assert "an sdxl LoRA and the base is sd1" in text
    with pytest.raises(LoraError, match="does not fit base"):
        apply_loras(sd1.pipe, (lora_ref(loras["sdxl-te2"]),))
    assert adapter_name(lora_ref(loras["sdxl-te2"]).sha256 or "") not in loaded_adapters(sd1.pipe)


def test_a_lora_of_other_shapes_is_refused_before_loading(sd1: LoadedPipeline, loras: dict[str, Path]) -> None:
    """The tiny SDXL UNet LoRA names no architecture (its widths are no real model's), so the shapes decide."""
    with pytest.raises(LoraError) as refused:
        check_fits(sd1, loras["sdxl-unet"])
    text = str(refused.value)
    assert "sdxl-unet.safetensors (made for unknown" in text and f"{sd1.path}" in text
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k has 32 inputs, the LoRA's 96" in text
    assert "transformer_blocks.1.attn1.to_k: no such module in the base" in text  # SDXL's second block
    assert "and 57 more" in text  # the first three are named
    adapters = dict(sd1.pipe.get_list_adapters())
    with pytest.raises(LoraError, match="does not fit"):
        apply_loras(sd1.pipe, (lora_ref(loras["sdxl-unet"]),))
    assert sd1.pipe.get_list_adapters() == adapters


def test_an_sd1_lora_on_sdxl_is_refused(sdxl_pipeline: Path, loras: dict[str, Path]) -> None:
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline, local_files_only=True)
    with pytest.raises(LoraError, match=r"StableDiffusionXLPipeline \(sdxl\).*96 inputs, the LoRA's 32"):
        check_fits(pipe, loras["sd1-te"])


def test_a_recorded_base_that_differs_is_a_warning(sd1: LoadedPipeline, tmp_path: Path, loras: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    state = load_file(str(loras["sd1-unet"]))
    other = _save(state, tmp_path / "other.safetensors", {"sdpipe.base_hash": "sha256:" + "f" * 16})
    same = _save(state, tmp_path / "same.safetensors", {"sdpipe.base_hash": sd1.hash})
    kohya = _save(state, tmp_path / "kohya.safetensors", {"ss_new_sd_model_hash": "e" * 64})
    (warning,) = check_fits(sd1, other).warnings
    assert "sdpipe.base_hash=sha256:ffff" in warning and str(sd1.hash) in warning
    assert check_fits(sd1, same).warnings == ()
    assert check_fits(sd1, kohya).warnings == ()  # a checkpoint file's hash: a folder cannot be compared with it
    assert check_fits(sd1.pipe, other).warnings == ()  # a bare pipeline (apply_loras' per-batch check) has no hash
    assert check_fits(sd1, loras["sd1-te"]).components == ("unet", "text_encoder")


def test_lycoris_and_dora_are_refused(sd1: LoadedPipeline, tmp_path: Path, loras: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    state = load_file(str(loras["sd1-unet"]))
    key = next(k for k in state if k.endswith(".lora_down.weight"))
    dora = _save(state | {key.replace("lora_down.weight", "dora_scale"): torch.ones(1, 32)}, tmp_path / "d.safetensors")
    with pytest.raises(LoraError, match="DoRA"):
        check_fits(sd1, dora)
    loha = {key.replace("lora_down.weight", "hada_w1_a"): torch.ones(32, 4)}
    with pytest.raises(LoraError, match="LoHa"):
        check_fits(sd1, _save(loha, tmp_path / "h.safetensors"))


# --------------------------------------------------------------------------- the --lora option


def test_split_lora_option() -> None:
    assert split_lora_option("style.safetensors") == ("style.safetensors", 1.0)
    assert split_lora_option("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert split_lora_option("style.safetensors:-1") == ("style.safetensors", -1.0)
    assert split_lora_option("style.safetensors:.5") == ("style.safetensors", 0.5)
    assert split_lora_option("pixel@prod:0.7") == ("pixel@prod", 0.7)
    assert split_lora_option(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)
    assert split_lora_option(r"C:\loras\style.safetensors:0.6") == (r"C:\loras\style.safetensors", 0.6)
    assert split_lora_option("a:b.safetensors") == ("a:b.safetensors", 1.0)  # no number after the last ':'
    assert split_lora_option("odd:2:1") == ("odd:2", 1.0)  # a name ending in ':<number>' takes a weight
    for text, message in [
        ("style.safetensors:5", "weight 5 is outside -4..4"),
        ("style.safetensors:-4.5", "outside -4..4"),
        ("style.safetensors:1e9", "outside"),
        (":0.8", "no file or NAME@ALIAS"),
        ("", "no file or NAME@ALIAS"),
    ]:
        with pytest.raises(LoraError, match=message) as refused:
            split_lora_option(text)
        assert f"--lora {text!r}" in str(refused.value)


def test_parse_lora_option(tmp_path: Path, loras: dict[str, Path]) -> None:
    src = loras["sd1-unet"]
    colon = Path(shutil.copy(src, tmp_path / "a:b.safetensors"))
    ref = parse_lora_option(f"{src}:0.8")
    assert ref == LoraRef(ref=str(src), weight=0.8, sha256=hashes.lora_sha256(src))
    assert parse_lora_option(str(colon)).ref == str(colon)
    assert parse_lora_option(f"{colon}:-0.5").weight == -0.5
    looked_up: list[str] = []

    def resolve(name: str) -> Path:
        looked_up.append(name)
        return src

    registry = parse_lora_option("pixel@prod:0.7", resolve=resolve)
    assert (registry.ref, registry.weight, looked_up) == ("pixel@prod", 0.7, ["pixel@prod"])
    with pytest.raises(LoraError, match="registry reference .* no registry"):
        parse_lora_option("pixel@prod")
    with pytest.raises(LoraError, match="no such file"):
        parse_lora_option(str(tmp_path / "missing.safetensors:0.5"))
    not_a_lora = _save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "weights.safetensors")
    with pytest.raises(LoraError, match=r"--lora .*weights.safetensors: .*not a model sdpipe knows"):
        parse_lora_option(str(not_a_lora))


def test_infotext_names_and_hashes(loras: dict[str, Path]) -> None:
    ref = lora_ref(loras["sd1-unet-copy"], 0.5)
    assert display_name(ref) == "copy_of_sd1-unet"
    assert display_name(LoraRef(ref="pixel@prod")) == "pixel"
    assert display_name(LoraRef(ref=r"C:\loras\a,b.safetensors")) == "a_b"
    assert infotext_hashes([ref]) == f"copy_of_sd1-unet: {hashes.lora_hash(loras['sd1-unet'])}"
    assert touches_text_encoder(loras["sd1-te"]) and not touches_text_encoder(loras["sd1-unet"])


def test_the_command_line_records_and_replays_loras(sd1_pipeline: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    """--lora FILE:W reaches the images (they differ from no LoRA), samples.jsonl records ref, weight and hash,
    the PNG has the web UIs' <lora:NAME:W> tag and `Lora hashes`, replay is bitwise; a misfit is one error line."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from sdpipe.cli import app
    from sdpipe.sampling.infotext import parse_lora_hashes, parse_parameters

    runner = CliRunner()
    base = [
        "generate",
        "--model",
        str(sd1_pipeline),
        "--prompt",
        "a cat",
        "--n",
        "1",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--quiet",
    ]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "l"), "--lora", f"{loras['sd1-te']}:0.7"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, [*base, "--out", str(tmp_path / "plain")]).exit_code == 0
    record = json.loads((tmp_path / "l" / "samples.jsonl").read_text())
    (entry,) = record["loras"]
    assert entry["weight"] == 0.7 and len(entry["sha256"]) == 64
    png = tmp_path / "l" / "00000.png"
    with Image.open(png) as im:
        params = parse_parameters(im.text["parameters"])
    assert params["prompt"] == "a cat <lora:sd1-te:0.7>"
    assert parse_lora_hashes(params["Lora hashes"]) == {"sd1-te": entry["sha256"][:12]}
    assert png.read_bytes() != (tmp_path / "plain" / "00000.png").read_bytes()
    result = runner.invoke(app, ["replay", str(png), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "00000.png").read_bytes() == png.read_bytes()
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--lora", str(loras["sdxl-unet"])])
    assert result.exit_code == 2 and "does not fit base" in result.output and "Traceback" not in result.output


def test_lora_by_registry_reference(
    sd1_pipeline: Path, loras: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--lora NAME@ALIAS:W takes the registered file: the pixels equal those of the same file by path; a
    registered LoRA recorded for another architecture than the base is refused naming both."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from sdpipe.cli import app
    from sdpipe.registry import Registry

    monkeypatch.setenv("SDPIPE_HOME", str(tmp_path / "home"))
    reg = Registry()
    reg.register(loras["sd1-te"], "style")
    reg.alias("style", "prod", 1)
    runner = CliRunner()
    base = [
        "generate",
        "--model",
        str(sd1_pipeline),
        "--prompt",
        "a cat",
        "--n",
        "1",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--quiet",
    ]
    for name, ref in (("by-name", "style@prod:0.7"), ("by-path", f"{loras['sd1-te']}:0.7")):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / name), "--lora", ref])
        assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "by-name" / "00000.png") as a, Image.open(tmp_path / "by-path" / "00000.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert "<lora:style:0.7>" in a.text["parameters"]
    reg.register(loras["sdxl-unet"], "xl")
    reg.alias("xl", "prod", 1)
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--lora", "xl@prod"])
    assert result.exit_code == 2 and "does not fit" in result.output, result.output
