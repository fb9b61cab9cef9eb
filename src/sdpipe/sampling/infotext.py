"""The web UI's PNG `parameters` text ("infotext"): write it and read it back.

AUTOMATIC1111's stable-diffusion-webui stores the generation parameters of an image in a PNG text chunk named
`parameters`, as three parts (`modules/processing.py` `create_infotext`)::

    a photo of a cat, <lora:film_grain:0.8>
    second prompt line
    Negative prompt: blurry, lowres
    Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 1024x1024, Model hash: 31e35c80fc, ...

The prompt (any number of lines), then an optional `Negative prompt:` (also any number of lines), then one last
line of `Key: value` pairs joined by `", "`. A value containing `,`, `:` or a newline is JSON-quoted
(`modules/infotext_utils.py` `quote`), so the parameters stay one line and split cleanly on commas.

The web UI's reader (`modules/infotext_utils.py` `parse_generation_parameters`) takes the last line as the
parameters only when its regex `re_param_code` finds at least 3 `Key: value` matches in it; otherwise that line is
prompt text too. :func:`parse_parameters` follows the same rule with the same regex.

Third-party readers are weaker: sd-parsers splits the parameters line on every `,` and then on every `:`, so a quoted
value containing a comma or a colon comes back mangled (`Model: "my, model"` reads as `"my`), even though the web UI
reads it correctly. :func:`webui_parameters` therefore removes `,` and `:` from model and LoRA names, as the web UI
itself does for the names it writes (`Model` in older `create_infotext`, the LoRA alias in `Lora hashes`), and keeps
quoting for the values that need it (`Lora hashes`, caller-supplied extras).

This module is a leaf: standard library only, nothing from sdpipe.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

__all__ = [
    "NEGATIVE_PROMPT",
    "RE_PARAM",
    "RE_PARAM_CODE",
    "format_parameters",
    "parse_lora_hashes",
    "parse_parameters",
    "parse_sampler",
    "parse_size",
    "quote",
    "safe_name",
    "unquote",
    "webui_parameters",
]

#: The web UI's `re_param_code` (`modules/infotext_utils.py`), verbatim: one `Key: value` entry, the value either a
#: JSON string or anything up to the next comma.
RE_PARAM_CODE = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
RE_PARAM = re.compile(RE_PARAM_CODE)
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
_RE_KEY = re.compile(r"\w[\w \-/]+")

#: The prefix of the first negative-prompt line.
NEGATIVE_PROMPT = "Negative prompt:"

#: `Schedule type` values that add nothing to the sampler name (the newer web UI's default).
_NO_SCHEDULE = ("", "Automatic")

_EMPTY: Mapping[str, object] = MappingProxyType({})


def quote(value: object) -> str:
    """`value` as it appears after `Key: ` in the parameters line (`modules/infotext_utils.py` `quote`).

    The web UI's rule: JSON-quote (`json.dumps(..., ensure_ascii=False)`) when the text contains `,`, `\\n` or `:`,
    otherwise write it as is. Two additions, both read back correctly by the web UI's own `unquote`: the JSON is of
    `str(value)` (the web UI dumps the raw object, which for a list would give JSON the regex cannot read), and a
    value that already starts and ends with `"`, or has leading or trailing whitespace, is quoted too (unquoted, the
    web UI's reader would strip the whitespace or JSON-decode the quotes away).
    """
    text = str(value)
    needs = "," in text or "\n" in text or ":" in text
    needs = needs or (len(text) >= 2 and text[0] == '"' and text[-1] == '"') or text != text.strip()
    return json.dumps(text, ensure_ascii=False) if needs else text


def unquote(text: str) -> str:
    """The inverse of :func:`quote` (`modules/infotext_utils.py` `unquote`): JSON-decode a `"…"` value; anything
    else, or a quoted value that is not valid JSON, comes back unchanged."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        decoded = json.loads(text)
    except ValueError:
        return text
    return decoded if isinstance(decoded, str) else text


def format_parameters(prompt: str, negative_prompt: str, params: Mapping[str, object | None]) -> str:
    """The `parameters` text, as `modules/processing.py` `create_infotext` builds it.

    `f"{prompt}"`, then `"\\nNegative prompt: " + negative_prompt` when there is one, then a newline and
    `", ".join(f"{key}: {quote(value)}")` over `params` in their order, leaving out `None` values; the whole text is
    stripped, as the web UI strips it. (The web UI writes a bare `key` when the value equals the key; its own reader
    then drops the entry, so this always writes `key: value`.)

    Keys must match the web UI's key pattern (`\\w[\\w \\-/]+`, no surrounding spaces), else `ValueError`: its reader
    could not find them. Note the reader's rule: a parameters line of fewer than 3 entries is read as prompt text.
    """
    entries = []
    for key, value in params.items():
        if value is None:
            continue
        if not _RE_KEY.fullmatch(key) or key != key.strip():
            raise ValueError(f"infotext key {key!r} does not match the web UI's pattern \\w[\\w \\-/]+")
        entries.append(f"{key}: {quote(value)}")
    negative = f"\n{NEGATIVE_PROMPT} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(entries)}".strip()


def safe_name(name: str) -> str:
    """A model or LoRA name with `,` and `:` removed and newlines turned into spaces, as the web UI cleans the names
    it writes (`create_infotext`'s `Model`, the Lora extension's aliases). The web UI would read a quoted comma back,
    but sd-parsers and other readers split on every comma and colon."""
    return name.replace(",", "").replace(":", "").replace("\r", " ").replace("\n", " ")


def webui_parameters(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str | None = None,
    model: str | None = None,
    denoising_strength: float | None = None,
    clip_skip: int = 1,
    loras: Sequence[tuple[str, str]] = (),
    version: str | None = None,
    extra: Mapping[str, object] = _EMPTY,
) -> str:
    """The `parameters` text with the web UI's keys in `create_infotext`'s order.

    `Steps, Sampler, CFG scale, Seed, Size (WxH), Model hash, Model, Denoising strength, Clip skip (only if > 1),
    Lora hashes, <extra>, Version`. `sampler` is the web-UI sampler name, in the older single-name form that every
    reader knows (`DPM++ 2M Karras`, not the newer `Sampler: DPM++ 2M, Schedule type: Karras`; :func:`parse_sampler`
    reads both). `loras` are `(name, short hash)` pairs, written as the Lora extension writes them:
    `Lora hashes: "name1: hash1, name2: hash2"`. Model and LoRA names go through :func:`safe_name`. The prompt is
    written as given: `<lora:NAME:W>` tags, if wanted, are the caller's to append.

    `ValueError` when an `extra` key repeats one of the keys above.
    """
    params: dict[str, object | None] = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": None if model is None else safe_name(model),
        "Denoising strength": denoising_strength,
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Lora hashes": ", ".join(f"{safe_name(name)}: {digest}" for name, digest in loras) or None,
    }
    clash = sorted((set(params) | {"Version"}) & set(extra))
    if clash:
        raise ValueError(f"extra infotext keys repeat standard ones: {', '.join(clash)}")
    params.update(extra)
    params["Version"] = version
    return format_parameters(prompt, negative_prompt, params)


def parse_parameters(text: str) -> dict[str, str]:
    """The prompt, negative prompt and parameters of a `parameters` text, as the web UI reads them
    (`modules/infotext_utils.py` `parse_generation_parameters`).

    Returns `{"prompt": …, "negative_prompt": …, <Key>: <value>, …}`, keys as written (`"Steps"`, `"CFG scale"`,
    …), values as strings, JSON-quoted values unquoted. Lines are stripped; the last line is the parameters line only
    if `re_param_code` finds at least 3 entries in it, otherwise it is prompt text. Every line from the first one
    starting `Negative prompt:` on is negative prompt (the prefix is removed from every line that has it, as the web
    UI does). Unlike the web UI this adds no defaults (no `Clip skip: 1`) and leaves `Size` whole: see
    :func:`parse_size`, :func:`parse_lora_hashes`, :func:`parse_sampler`.
    """
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt = ""
    negative = ""
    done_with_prompt = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(NEGATIVE_PROMPT):
            done_with_prompt = True
            line = line[len(NEGATIVE_PROMPT) :].strip()
        if done_with_prompt:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line

    result = {"prompt": prompt, "negative_prompt": negative}
    for key, value in RE_PARAM.findall(last):
        result[key] = unquote(value)
    return result


def parse_size(value: str) -> tuple[int, int]:
    """`(width, height)` from a `Size` value such as `1024x768` (the web UI's `re_imagesize`); `ValueError`
    otherwise."""
    match = _RE_IMAGESIZE.match(value.strip())
    if match is None:
        raise ValueError(f"not a WxH size: {value!r}")
    return int(match.group(1)), int(match.group(2))


def parse_lora_hashes(value: str) -> dict[str, str]:
    """`{name: hash}` from a `Lora hashes` value, `name1: hash1, name2: hash2`, split as the web UI's Lora
    extension does when pasting an infotext (`infotext_pasted`): on `,`, then on the first `:`. Entries without a
    colon are skipped."""
    hashes: dict[str, str] = {}
    for item in value.split(","):
        name, sep, digest = item.partition(":")
        if sep and name.strip():
            hashes[name.strip()] = digest.strip()
    return hashes


def parse_sampler(params: Mapping[str, str]) -> str:
    """The sampler as one web-UI name, from either form: the older `Sampler: DPM++ 2M Karras`, or the newer
    `Sampler: DPM++ 2M, Schedule type: Karras` (joined to `DPM++ 2M Karras`; `Schedule type: Automatic` adds
    nothing). `KeyError` when there is no `Sampler`."""
    sampler = params["Sampler"].strip()
    schedule = params.get("Schedule type", "").strip()
    if schedule in _NO_SCHEDULE or sampler.endswith(f" {schedule}"):
        return sampler
    return f"{sampler} {schedule}"
