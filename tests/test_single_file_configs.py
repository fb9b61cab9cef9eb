"""The shipped single-file configs: real CLIP token ids, real architectures (parameter counts), offline and once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_fixtures import no_network
from sdpipe.models import single_file_configs as sfc

CLIP_L_TEXT = 123_060_480  # OpenAI CLIP ViT-L/14 text tower (SD 1.x, SDXL's first encoder)
OPENCLIP_H_TEXT = 340_387_840  # OpenCLIP ViT-H/14 text tower as SD 2 uses it (23 of its 24 layers)
BIGG_TEXT_PROJ = 694_659_840  # OpenCLIP bigG/14 text tower with projection (SDXL's second encoder)
VAE = 83_653_863
SD15_UNET, SD2_UNET, SDXL_UNET = 859_520_964, 865_910_724, 2_567_463_684
INPAINT_EXTRA = 5 * 320 * 3 * 3  # 9 input channels instead of 4 in conv_in (320 filters of 3x3)

EXPECTED = {
    "sd15": {"unet": SD15_UNET, "vae": VAE, "text_encoder": CLIP_L_TEXT},
    "sd15-inpaint": {"unet": SD15_UNET + INPAINT_EXTRA, "vae": VAE, "text_encoder": CLIP_L_TEXT},
    "sd2-v": {"unet": SD2_UNET, "vae": VAE, "text_encoder": OPENCLIP_H_TEXT},
    "sd2-base": {"unet": SD2_UNET, "vae": VAE, "text_encoder": OPENCLIP_H_TEXT},
    "sd2-inpaint": {"unet": SD2_UNET + INPAINT_EXTRA, "vae": VAE, "text_encoder": OPENCLIP_H_TEXT},
    "sdxl-base": {"unet": SDXL_UNET, "vae": VAE, "text_encoder": CLIP_L_TEXT, "text_encoder_2": BIGG_TEXT_PROJ},
    "sdxl-inpaint": {
        "unet": SDXL_UNET + INPAINT_EXTRA,
        "vae": VAE,
        "text_encoder": CLIP_L_TEXT,
        "text_encoder_2": BIGG_TEXT_PROJ,
    },
}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """One cache for this module, never the user's."""
    monkeypatch.setenv("SDPIPE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "single-file-config-cache"))


def test_names_match_the_shipped_folders() -> None:
    shipped = {p.name for p in (Path(sfc.__file__).parent / "configs").iterdir() if p.is_dir()}
    assert shipped == set(sfc.CONFIG_NAMES)
    assert set(EXPECTED) == set(sfc.CONFIG_NAMES)


@pytest.mark.usefixtures("offline")
def test_clip_vocabulary_is_clips() -> None:
    vocab, merges = sfc.clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    tok = sfc.clip_tokenizer("sd15")
    assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (49406, 49407, 77)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407  # SD 1.x pads with the end token
    for name in ("sd2-v", "sd2-base", "sd2-inpaint"):
        assert sfc.clip_tokenizer(name).pad_token_id == 0  # SD 2.x pads with "!" (open_clip's 0)
    xl1, xl2 = sfc.clip_tokenizer("sdxl-base"), sfc.clip_tokenizer("sdxl-base", "tokenizer_2")
    assert (xl1.pad_token, xl2.pad_token, xl2.pad_token_id) == ("<|endoftext|>", "!", 0)
    assert xl2("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("name", sfc.CONFIG_NAMES)
@pytest.mark.usefixtures("offline")
def test_components_build_with_the_real_parameter_counts(name: str) -> None:
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    folder = sfc.config_folder(name)
    index = json.loads((folder / "model_index.json").read_text())
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
    assert all((folder / k).is_dir() for k in components), "from_single_file loads every listed component"
    assert diffusers.DiffusionPipeline.load_config(folder)["_class_name"] == index["_class_name"]
    counts = {}
    with init_empty_weights():  # meta tensors: no memory, no weights read
        for part in ("unet", "vae"):
            cls = getattr(diffusers, index[part][1])
            model = cls.from_config(cls.load_config(folder / part))
            counts[part] = sum(p.numel() for p in model.parameters())
        for part in ("text_encoder", "text_encoder_2"):
            if part in components:
                config = transformers.CLIPTextConfig.from_pretrained(folder / part, local_files_only=True)
                model = getattr(transformers, index[part][1])(config)
                assert next(model.parameters()).device.type == "meta"
                counts[part] = sum(p.numel() for p in model.parameters())
    assert counts == EXPECTED[name]
    scheduler_cls = getattr(diffusers, index["scheduler"][1])
    scheduler = scheduler_cls.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    assert scheduler.config.prediction_type == ("v_prediction" if name == "sd2-v" else "epsilon")
    assert scheduler.config.steps_offset == 1 and scheduler.config.beta_schedule == "scaled_linear"


def test_config_folder_is_written_once_and_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDPIPE_CACHE_DIR", str(tmp_path))
    with no_network() as attempts:
        first = sfc.config_folder("sdxl-base")
        assert first == tmp_path / "single-file-configs" / sfc.__version__ / "sdxl-base"
        vocab = first / "tokenizer_2" / "vocab.json"
        stamp_mtime, vocab_mtime = (first / sfc.STAMP).stat().st_mtime_ns, vocab.stat().st_mtime_ns
        assert sfc.config_folder("sdxl-base") == first
        assert (first / sfc.STAMP).stat().st_mtime_ns == stamp_mtime and vocab.stat().st_mtime_ns == vocab_mtime
        assert [p.name for p in first.parent.iterdir()] == ["sdxl-base"], "no temporary folder left behind"
        # a folder from another template (or a half-copied one without a stamp) is replaced, not trusted
        (first / sfc.STAMP).write_text("something else\n")
        (first / "unet" / "config.json").write_text("{}")
        again = sfc.config_folder("sdxl-base")
        assert json.loads((again / "unet" / "config.json").read_text())["cross_attention_dim"] == 2048
    assert attempts == []
    with pytest.raises(ValueError, match="unknown single-file config"):
        sfc.config_folder("sd3")


def test_concurrent_writers_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("SDPIPE_CACHE_DIR", str(tmp_path))
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: sfc.config_folder("sd15"), range(4)))
    assert len(set(folders)) == 1
    assert [p.name for p in folders[0].parent.iterdir()] == ["sd15"]
    assert sfc.clip_tokenizer("sd15")("a cat").input_ids == [49406, 320, 2368, 49407]
