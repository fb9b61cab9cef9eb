"""Local config folders for web-UI single-file checkpoints, so `from_single_file` never downloads.

diffusers' `from_single_file` needs a diffusers-format folder of component configs (and a tokenizer) beside the
checkpoint. Without `config=` it downloads one from the Hub, and with `local_files_only=True` and an empty cache it
switches `local_files_only` off and downloads anyway (`diffusers/loaders/single_file.py`). sdpipe therefore always
passes `config=<folder>`, and this module provides those folders.

The folders are JSON only (no weights), copied from the public models' own `model_index.json` and component
configs (`configs/<name>/`), plus one CLIP vocabulary shipped as open_clip's `bpe_simple_vocab_16e6.txt.gz` (MIT;
see `configs/NOTICE.clip_bpe.txt`). `vocab.json`/`merges.txt` are rebuilt from it the way open_clip's
`SimpleTokenizer` builds its table, so the ids match CLIP's (bos 49406, eos 49407). The assembled folder is written
once, atomically, into `$SDPIPE_CACHE_DIR/single-file-configs/<sdpipe version>/<name>/` and reused after that.

The model_index files set `safety_checker` and `feature_extractor` to null: sdpipe never loads the safety checker,
and a listed component whose folder is missing would make `from_single_file` fail.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sdpipe import __version__
from sdpipe.models.hashes import cache_dir

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

CONFIG_NAMES: tuple[str, ...] = (
    "sd15",
    "sd15-inpaint",
    "sd2-v",
    "sd2-base",
    "sd2-inpaint",
    "sdxl-base",
    "sdxl-inpaint",
)
"""The shipped templates: SD 1.5 (+ inpainting), SD 2 768-v / 512-base / inpainting, SDXL base 1.0 / inpainting 0.1."""

BPE_FILE = "clip_bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 48894
"""CLIP uses the first 49152 - 256 - 2 merges of the file (open_clip: `merges[1 : 49152 - 256 - 2 + 1]`)."""
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
STAMP = ".sdpipe-template"
"""A file in each written folder holding the hash of the template it came from, so an edited template (same
sdpipe version, e.g. during development) replaces a stale cached folder instead of being shadowed by it."""


def _templates() -> Path:
    """The shipped `configs/` folder (package data; a real directory for both wheels and editable installs)."""
    return Path(str(resources.files("sdpipe.models") / "configs"))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE works on.

    The 188 printable bytes map to themselves; the other 68 are shifted to code points 256 and up, in byte order.
    The table's order (printable first) is also the order of the first 256 vocabulary ids, so `!` is id 0.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49408-id vocabulary and its 48894 merges, rebuilt from the shipped BPE file.

    vocab = the 256 byte characters, the same with `</w>` (end of word), every merge's joined pair, then the two
    special tokens: exactly open_clip's `SimpleTokenizer` table, hence bos 49406 and eos 49407.
    """
    lines = gzip.decompress((_templates() / BPE_FILE).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split(" ")) for m in merges]
    tokens += list(SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):  # a duplicate would silently shift every later id
        raise ValueError(f"{BPE_FILE}: the rebuilt vocabulary has duplicate tokens")
    return vocab, merges


def _template_hash(template: Path) -> str:
    """sha256 over the template's relative paths and bytes, plus the BPE file's: what the written folder holds."""
    h = hashlib.sha256()
    for path in sorted(p for p in template.rglob("*") if p.is_file()):
        h.update(path.relative_to(template).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    h.update((_templates() / BPE_FILE).read_bytes())
    return h.hexdigest()


def _write_vocab_pair(folder: Path) -> None:
    """Write `vocab.json` and `merges.txt` (with its `#version: 0.2` header, as tokenizers expects) into folder."""
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _build(template: Path, target: Path) -> None:
    """Copy the template into target and give every `tokenizer*/` subfolder the CLIP vocabulary pair.

    Contents only, never modes: an installed package may be read-only, and the copy must stay writable (the
    vocabulary goes into the copied folders, and a stale copy is later replaced).
    """
    for path in sorted(template.rglob("*")):
        dest = target / path.relative_to(template)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    for sub in sorted(target.iterdir()):
        if sub.is_dir() and sub.name.startswith("tokenizer"):
            _write_vocab_pair(sub)


def config_folder(name: str) -> Path:
    """The local diffusers config folder for `name` (one of `CONFIG_NAMES`), written on first use.

    Pass it as `from_single_file(path, config=config_folder(name), local_files_only=True)`. The folder is built in
    a temporary sibling and renamed into place, so a concurrent or interrupted writer never leaves a half-written
    folder that a later call would trust; a folder whose stamp does not match the shipped template is replaced.
    Reads only local files.
    """
    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown single-file config {name!r}; expected one of: {', '.join(CONFIG_NAMES)}")
    template = _templates() / name
    digest = _template_hash(template)
    target = cache_dir() / "single-file-configs" / __version__ / name
    if _is_current(target, digest):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        built = tmp / name
        _build(template, built)
        (built / STAMP).write_text(digest + "\n")
        if _is_current(target, digest):  # another process finished first: keep its copy
            return target
        if target.exists():  # stale (another template) or unstamped (interrupted by hand): move it aside
            os.rename(target, tmp / "stale")
        try:
            os.rename(built, target)
        except OSError:
            if not _is_current(target, digest):  # not just another process's identical copy winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_current(folder: Path, digest: str) -> bool:
    """Whether folder was written, completely, from the template with this digest (its stamp is written last)."""
    stamp = folder / STAMP
    try:
        return stamp.read_text().strip() == digest
    except OSError:
        return False


def clip_tokenizer(name: str, subfolder: str = "tokenizer") -> CLIPTokenizer:
    """The CLIP tokenizer of config `name` (SDXL's second one with `subfolder="tokenizer_2"`), loaded offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(config_folder(name) / subfolder, local_files_only=True)
