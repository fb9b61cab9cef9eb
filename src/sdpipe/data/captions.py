"""Caption checks for `sdpipe data validate`: counts, token lengths against the text encoder's window, duplicates.

`caption_section` reads the accepted samples' (path, caption) pairs in batches (twice at most: the second pass
only when some caption repeats) and returns the report's `captions` section, or None when the source has no
captions at all. Per sample it keeps a few bytes (token count, word count, a 64-bit caption hash), so it
streams any size of manifest. Tokens are counted with the tokenizer the text encoder uses, special tokens
included, in batches.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from sdpipe.config import ConfigError
from sdpipe.data.manifest import iter_rows

LISTED = 1000  # paths listed by name in each list (the counts are always complete)
TOP = 20  # most repeated captions shown
BATCH = 1024  # captions tokenized at once
DEFAULT_TOKENIZER = "clip (sd15, shipped with sdpipe)"

Batches = Callable[[], Iterable[list[tuple[str, str | None]]]]  # called once per pass


@lru_cache(maxsize=4)
def load_tokenizer(folder: str | None) -> Any:
    """The tokenizer in `folder` (data.caption_tokenizer), or the CLIP tokenizer sdpipe ships when None."""
    if folder is None:
        # Imported here: data must not import models at module level (config <- data <- models). The module
        # itself imports only sdpipe.__version__ and sdpipe.models.hashes (stdlib only); the package import it
        # triggers (torch, diffusers; a few seconds) imports nothing of sdpipe.data, so there is no cycle.
        from sdpipe.models.single_file_configs import clip_tokenizer

        return clip_tokenizer("sd15")
    if not Path(folder).is_dir():
        raise ConfigError(f"data.caption_tokenizer={folder!r}: no such folder; give a tokenizer folder or unset it")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a tokenizer folder"
        raise ConfigError(
            f"data.caption_tokenizer={folder!r}: not a tokenizer folder ({type(exc).__name__}: {_first_line(exc)}); "
            "give a folder with tokenizer_config.json and the vocabulary files, or unset it"
        ) from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def token_counts(tokenizer: Any, captions: list[str]) -> list[int]:
    """Tokens of each caption as the text encoder sees them (start and end tokens included), untruncated."""
    if not captions:
        return []
    ids = tokenizer(captions, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return [len(x) for x in ids]


def tokens_cut(tokens: int, max_tokens: int) -> int:
    """How many tokens a window of `max_tokens` drops from a caption of `tokens`."""
    return max(0, tokens - max_tokens)


def is_empty(caption: str) -> bool:
    return not caption.strip()


def word_count(caption: str) -> int:
    return len(caption.split())


def caption_key(caption: str) -> int:
    """A 64-bit hash of a caption, whitespace runs collapsed: equal keys are the same caption."""
    return int.from_bytes(hashlib.blake2b(" ".join(caption.split()).encode(), digest_size=8).digest(), "big")


def spread(values: Sequence[int] | array) -> dict[str, float] | None:
    """min / median / p95 / max of `values` (None when there are none)."""
    arr = np.asarray(values, dtype=np.int64)
    if not arr.size:
        return None
    med, p95 = np.percentile(arr, [50, 95])
    return {"min": int(arr.min()), "median": float(med), "p95": round(float(p95), 1), "max": int(arr.max())}


@dataclass
class _Tally:
    """Pass 1 over the captions: counts, per-caption numbers and the first LISTED paths of each list."""

    max_tokens: int
    unreadable: set[str]  # image paths whose caption file could not be decoded
    missing: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    undecodable: int = 0
    n_missing: int = 0
    n_empty: int = 0
    tokens: array = field(default_factory=lambda: array("i"))
    words: array = field(default_factory=lambda: array("i"))
    keys: array = field(default_factory=lambda: array("Q"))
    over_long: list[tuple[int, int, str]] = field(default_factory=list)  # heap of (cut, order, path)
    n_over: int = 0
    cut_total: int = 0

    def add(self, batch: list[tuple[str, str | None]], count: Callable[[list[str]], list[int]]) -> None:
        texts: list[tuple[str, str]] = []
        for path, caption in batch:
            if caption is None:
                if path in self.unreadable:
                    self.undecodable += 1
                else:
                    self.n_missing += 1
                    _listed(self.missing, path)
            elif is_empty(caption):
                self.n_empty += 1
                _listed(self.empty, path)
            else:
                texts.append((path, caption))
        if not texts:
            return
        counts = count([c for _, c in texts])
        for (path, caption), n in zip(texts, counts, strict=True):
            self.tokens.append(n)
            self.words.append(word_count(caption))
            self.keys.append(caption_key(caption))
            cut = tokens_cut(n, self.max_tokens)
            if cut:
                self.n_over += 1
                self.cut_total += cut
                entry = (cut, -self.n_over, path)  # ties: the earlier path stays
                if len(self.over_long) < LISTED:
                    heapq.heappush(self.over_long, entry)
                else:
                    heapq.heappushpop(self.over_long, entry)


def _listed(paths: list[str], path: str) -> None:
    if len(paths) < LISTED:
        paths.append(path)


def caption_section(
    batches: Batches,
    max_tokens: int,
    problems: list[dict],
    tokenizer: str | None = None,
    count: Callable[[list[str]], list[int]] | None = None,
) -> dict[str, Any] | None:
    """The report's `captions` section for the (path, caption) pairs `batches()` yields; None without captions.

    `problems` are the caption files that could not be read (`{path, image, reason}`); their images are
    counted as `undecodable`, not `missing`. Tokens are counted by `count` (default: `token_counts` with the
    tokenizer `tokenizer` names, loaded only if some caption is not empty).
    """
    tally = _Tally(max_tokens, {p["image"] for p in problems if p.get("image")})
    count = count or (lambda texts: token_counts(load_tokenizer(tokenizer), texts))
    for batch in batches():
        tally.add(batch, count)
    captioned = len(tally.tokens)
    if not captioned and not tally.n_empty and not problems:
        return None
    over = sorted(tally.over_long, reverse=True)
    section: dict[str, Any] = {
        "tokenizer": tokenizer or DEFAULT_TOKENIZER,
        "max_tokens": max_tokens,
        "captioned": captioned,
        "missing": tally.n_missing,
        "empty": tally.n_empty,
        "undecodable": tally.undecodable,
        "tokens": spread(tally.tokens),
        "words": spread(tally.words),
        "over_long": tally.n_over,
        "tokens_cut": tally.cut_total,
        "over_long_paths": [{"path": p, "tokens": cut + max_tokens, "cut": cut} for cut, _, p in over],
        "missing_paths": tally.missing,
        "empty_paths": tally.empty,
        "problems": problems,
    }
    return section | duplicates(batches, tally.keys)


def duplicates(batches: Batches, keys: array) -> dict[str, Any]:
    """Distinct captions, the most repeated ones with counts, and the images sharing a caption with another."""
    hashes = np.frombuffer(keys, dtype=np.uint64) if keys else np.zeros(0, np.uint64)
    values, counts = np.unique(hashes, return_counts=True)
    repeated = {int(v): int(c) for v, c in zip(values, counts, strict=True) if c > 1}
    top = dict(sorted(repeated.items(), key=lambda kv: -kv[1])[:TOP])
    texts: dict[int, str] = {}
    sharing: list[str] = []
    if repeated:
        for path, caption in _captioned(batches):
            key = caption_key(caption)
            if key in repeated:
                _listed(sharing, path)
                if key in top:
                    texts.setdefault(key, caption)
    return {
        "distinct": len(values),
        "most_repeated": [{"caption": texts[k], "count": c} for k, c in top.items()],
        "sharing": sum(repeated.values()),
        "sharing_paths": sharing,
    }


def _captioned(batches: Batches) -> Iterator[tuple[str, str]]:
    for batch in batches():
        for path, caption in batch:
            if caption is not None and not is_empty(caption):
                yield path, caption


def manifest_batches(manifest: Path) -> Batches:
    """(path, caption) pairs of a manifest, BATCH at a time, re-readable (one read per call)."""

    def read() -> Iterator[list[tuple[str, str | None]]]:
        batch: list[tuple[str, str | None]] = []
        for row in iter_rows(manifest, ["path", "caption"], batch=BATCH):
            batch.append((row["path"], row["caption"]))
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    return read
