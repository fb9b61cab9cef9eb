"""The web UI's PNG `parameters` text: our writer, our reader, the web UI's own regex, and sd-parsers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdpipe.sampling.infotext import (
    format_parameters,
    parse_lora_hashes,
    parse_parameters,
    parse_sampler,
    parse_size,
    quote,
    safe_name,
    unquote,
    webui_parameters,
)

# The web UI's regex, copied here on purpose rather than imported: the check must not share our module's copy.
WEBUI_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

SDXL: dict[str, Any] = {
    "prompt": "a photo of an astronaut riding a horse, golden hour <lora:film_grain:0.8>",
    "negative_prompt": "blurry, lowres",
    "steps": 30,
    "sampler": "DPM++ 2M Karras",
    "cfg_scale": 6.5,
    "seed": 1234567890,
    "width": 1024,
    "height": 1024,
    "model_hash": "31e35c80fc",
    "model": "sd_xl_base_1.0",
    "loras": [("film_grain", "a1b2c3d4e5f6")],
    "version": "sdpipe 0.4.0",
}


def webui_reading(text: str) -> dict[str, str]:
    """The key/values the web UI's `parse_generation_parameters` takes from the last line, done independently:
    its regex, its ≥3-matches rule, and its `unquote` (json.loads of a "…" value)."""
    last = text.strip().split("\n")[-1]
    found = WEBUI_RE_PARAM.findall(last)
    if len(found) < 3:
        return {}
    return {k: (json.loads(v) if len(v) >= 2 and v[0] == '"' and v[-1] == '"' else v) for k, v in found}


def params_only(parsed: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in parsed.items() if k not in ("prompt", "negative_prompt")}


def test_round_trip_without_negative_prompt() -> None:
    text = webui_parameters(**{**SDXL, "negative_prompt": "", "loras": [], "version": None})
    assert "Negative prompt" not in text
    assert text == (
        "a photo of an astronaut riding a horse, golden hour <lora:film_grain:0.8>\n"
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234567890, Size: 1024x1024, "
        "Model hash: 31e35c80fc, Model: sd_xl_base_1.0"
    )
    parsed = parse_parameters(text)
    assert parsed == {
        "prompt": SDXL["prompt"],
        "negative_prompt": "",
        "Steps": "30",
        "Sampler": "DPM++ 2M Karras",
        "CFG scale": "6.5",
        "Seed": "1234567890",
        "Size": "1024x1024",
        "Model hash": "31e35c80fc",
        "Model": "sd_xl_base_1.0",
    }


def test_round_trip_multiline_prompt_and_negative_prompt() -> None:
    prompt = "a castle on a hill\n\n(masterpiece:1.2), dramatic sky\nwide shot"
    negative = "lowres, bad anatomy\nwatermark"
    text = webui_parameters(**{**SDXL, "prompt": prompt, "negative_prompt": negative})
    assert text.split("\n")[4] == "Negative prompt: lowres, bad anatomy"
    parsed = parse_parameters(text)
    assert parsed["prompt"] == prompt
    assert parsed["negative_prompt"] == negative
    assert parsed["Seed"] == "1234567890"


def test_round_trip_negative_prompt() -> None:
    text = webui_parameters(**SDXL)
    parsed = parse_parameters(text)
    assert parsed["prompt"] == SDXL["prompt"]
    assert parsed["negative_prompt"] == "blurry, lowres"
    assert parsed["Version"] == "sdpipe 0.4.0"
    assert list(params_only(parsed)) == [
        "Steps",
        "Sampler",
        "CFG scale",
        "Seed",
        "Size",
        "Model hash",
        "Model",
        "Lora hashes",
        "Version",
    ]


def test_round_trip_quoted_values() -> None:
    extra = {
        "Hires upscaler": "4x-UltraSharp, v2",
        "ADetailer prompt": 'a face: smiling, "happy"',
        "Comment": "first line\nsecond line",
        "Padded": "  spaced ",
        "Quoted": '"already quoted"',
        "Unicode": "café, ñ",
    }
    text = webui_parameters(**SDXL, extra=extra)
    parsed = parse_parameters(text)
    for key, value in extra.items():
        assert parsed[key] == value
    assert len(text.split("\n")) == 3  # the newline stayed inside the quotes
    last = text.split("\n")[-1]
    assert 'Hires upscaler: "4x-UltraSharp, v2"' in last
    assert 'ADetailer prompt: "a face: smiling, \\"happy\\""' in last
    assert 'Comment: "first line\\nsecond line"' in last
    assert 'Unicode: "café, ñ"' in last  # ensure_ascii=False, as the web UI
    assert parsed["Version"] == "sdpipe 0.4.0"  # extras come before Version
    assert list(params_only(parsed))[-1] == "Version"


def test_round_trip_lora_hashes() -> None:
    loras = [("film_grain", "a1b2c3d4e5f6"), ("detail, tweaker: xl", "0f1e2d3c4b5a")]
    text = webui_parameters(**{**SDXL, "loras": loras})
    parsed = parse_parameters(text)
    assert parse_lora_hashes(parsed["Lora hashes"]) == {
        "film_grain": "a1b2c3d4e5f6",
        "detail tweaker xl": "0f1e2d3c4b5a",
    }
    assert parsed["Version"] == "sdpipe 0.4.0"  # the quoted commas did not split the line
    assert 'Lora hashes: "film_grain: a1b2c3d4e5f6, detail tweaker xl: 0f1e2d3c4b5a"' in text


@pytest.mark.parametrize(("clip_skip", "written"), [(1, None), (2, "2")])
def test_clip_skip_only_when_above_one(clip_skip: int, written: str | None) -> None:
    text = webui_parameters(**SDXL, clip_skip=clip_skip)
    parsed = parse_parameters(text)
    assert parsed.get("Clip skip") == written
    assert ("Clip skip" in text) == (written is not None)


def test_round_trip_img2img_denoising_strength() -> None:
    text = webui_parameters(**{**SDXL, "loras": []}, denoising_strength=0.55, clip_skip=2)
    assert text.endswith(
        "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.55, Clip skip: 2, Version: sdpipe 0.4.0"
    )
    parsed = parse_parameters(text)
    assert parsed["Denoising strength"] == "0.55"
    assert float(parsed["Denoising strength"]) == 0.55


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"negative_prompt": "", "loras": []},
        {"denoising_strength": 0.3, "clip_skip": 2},
        {"loras": [("a", "1"), ("b", "2")], "extra": {"Hires upscaler": "Latent, x2", "Tiling": "True"}},
        {"prompt": "line one\nline two: with a colon, and a comma", "negative_prompt": "n1\nn2"},
    ],
)
def test_webui_regex_agrees_with_parser(kwargs: dict[str, Any]) -> None:
    text = webui_parameters(**{**SDXL, **kwargs})
    ours = params_only(parse_parameters(text))
    theirs = webui_reading(text)
    assert theirs == ours
    assert len(theirs) >= 5


def test_sd_parsers_reads_our_png(tmp_path: Path) -> None:
    sd_parsers = pytest.importorskip("sd_parsers")
    from sd_parsers.data import Generators

    prompt = "a photo of an astronaut riding a horse, golden hour\nfilm photo <lora:film_grain:0.8>"
    text = webui_parameters(**{**SDXL, "prompt": prompt, "model": "sd_xl, base: 1.0"})
    path = tmp_path / "sdxl.png"
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)

    result = sd_parsers.ParserManager().parse(path)
    assert result is not None
    assert result.generator == Generators.AUTOMATIC1111
    assert result.full_prompt == prompt
    assert result.full_negative_prompt == "blurry, lowres"
    (sampler,) = result.samplers
    assert sampler.name == "DPM++ 2M Karras"
    assert sampler.parameters == {"cfg_scale": "6.5", "seed": "1234567890", "steps": "30"}
    assert sampler.model is not None
    assert (sampler.model.name, sampler.model.hash) == ("sd_xl base 1.0", "31e35c80fc")
    assert parse_size(result.metadata["Size"]) == (1024, 1024)
    assert result.metadata["Version"] == "sdpipe 0.4.0"


def test_short_last_line_is_prompt_text() -> None:
    # the web UI's rule: fewer than 3 `Key: value` matches and the last line is part of the prompt
    text = "a cat\nStyle: photo, Mood: calm"
    assert parse_parameters(text) == {"prompt": "a cat\nStyle: photo, Mood: calm", "negative_prompt": ""}
    assert webui_reading(text) == {}
    written = format_parameters("a cat", "ugly", {"Steps": 20, "Seed": 1})
    assert parse_parameters(written) == {"prompt": "a cat", "negative_prompt": "ugly\nSteps: 20, Seed: 1"}
    three = format_parameters("a cat", "", {"Steps": 20, "Seed": 1, "Sampler": "Euler a"})
    assert parse_parameters(three) == {
        "prompt": "a cat",
        "negative_prompt": "",
        "Steps": "20",
        "Seed": "1",
        "Sampler": "Euler a",
    }


def test_quoting_protects_the_parse() -> None:
    """Fails if `quote` stops quoting: a comma in a model name would split the entry, a colon in a value
    would start a spurious key, a newline would end the parameters line."""
    params = {
        "Steps": 20,
        "Sampler": "Euler a",
        "Model": "my, model",
        "Note": "a: b",
        "Comment": "x\ny",
        "Seed": 7,
    }
    text = format_parameters("a cat, sitting", "", params)
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "a cat, sitting"
    assert params_only(parsed) == {k: str(v) for k, v in params.items()}
    assert webui_reading(text) == params_only(parsed)
    assert text == (
        'a cat, sitting\nSteps: 20, Sampler: Euler a, Model: "my, model", Note: "a: b", Comment: "x\\ny", Seed: 7'
    )


def test_format_parameters_drops_none_and_keeps_order() -> None:
    text = format_parameters("p", "", {"Steps": 4, "Model hash": None, "Sampler": "Euler", "Seed": 0})
    assert text == "p\nSteps: 4, Sampler: Euler, Seed: 0"


def test_format_parameters_rejects_keys_the_regex_cannot_read() -> None:
    for key in ("S", " Steps", "Steps ", "Seed:", "a,b", "-x"):
        with pytest.raises(ValueError, match="pattern"):
            format_parameters("p", "", {key: 1, "Steps": 1, "Seed": 2})


def test_extra_may_not_repeat_standard_keys() -> None:
    with pytest.raises(ValueError, match="Seed, Version"):
        webui_parameters(**SDXL, extra={"Seed": 1, "Version": "x"})


def test_quote_follows_the_webui_rule() -> None:
    def webui_quote(text: object) -> object:  # modules/infotext_utils.py quote, verbatim in behaviour
        if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
            return text
        return json.dumps(text, ensure_ascii=False)

    for value in ["Euler a", "a, b", "a: b", "a\nb", "café, ñ", "1024x1024", 'say "hi"', 7, 6.5]:
        assert quote(value) == str(webui_quote(value))
        assert unquote(quote(value)) == str(value)
    # our additions, which the web UI's unquote reads back correctly
    assert quote('"x"') == '"\\"x\\""'
    assert quote(" x") == '" x"'
    assert unquote('"broken') == '"broken'
    assert unquote('"not json\\"') == '"not json\\"'


def test_parse_sampler_reads_both_forms() -> None:
    assert parse_sampler({"Sampler": "DPM++ 2M Karras"}) == "DPM++ 2M Karras"
    assert parse_sampler({"Sampler": "DPM++ 2M", "Schedule type": "Karras"}) == "DPM++ 2M Karras"
    assert parse_sampler({"Sampler": "Euler a", "Schedule type": "Automatic"}) == "Euler a"
    assert parse_sampler({"Sampler": "DPM++ 2M Karras", "Schedule type": "Karras"}) == "DPM++ 2M Karras"
    newer = parse_parameters("cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1")
    assert parse_sampler(newer) == "DPM++ 2M Karras"
    with pytest.raises(KeyError):
        parse_sampler({})


def test_parse_size_and_lora_hashes() -> None:
    assert parse_size("832x1216") == (832, 1216)
    for bad in ("832", "832x", "ax1", "8x8x8"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_lora_hashes("a: 1, b: 2,, junk") == {"a": "1", "b": "2"}


def test_safe_name() -> None:
    assert safe_name("my, model: v2\nfinal") == "my model v2 final"
    assert safe_name("sd_xl_base_1.0") == "sd_xl_base_1.0"


def test_pixel_class_text_is_unchanged() -> None:
    # today's digits PNGs: `label: N` as the prompt line, then the parameters
    text = format_parameters(
        "label: 3",
        "",
        {"Steps": 4, "Sampler": "ddim", "CFG scale": 1.0, "Seed": 5, "Size": "28x28", "Version": "sdpipe 0.1"},
    )
    assert text == "label: 3\nSteps: 4, Sampler: ddim, CFG scale: 1.0, Seed: 5, Size: 28x28, Version: sdpipe 0.1"
    assert parse_parameters(text)["prompt"] == "label: 3"
