"""Train/validation splits decided by content alone, so they survive renames, moves and added files.

A sample's split is a pure function of the sha256 of its content and the validation fraction: the first 64
bits of the hash, read as a number in [0, 1), fall below the fraction or not. Adding files never moves an
existing sample to the other split, and raising the fraction only moves samples from train to validation.
"""

from __future__ import annotations

from typing import Literal

Split = Literal["train", "validation"]
SPLITS: tuple[Split, ...] = ("train", "validation")


def split_position(content_sha256: str) -> float:
    """Where a hash falls in [0, 1): its first 16 hex digits as a fraction (an optional 'sha256:' is ignored)."""
    digest = content_sha256.removeprefix("sha256:")
    try:
        return int(digest[:16], 16) / 2.0**64
    except ValueError:
        raise ValueError(f"not a hex sha256 digest: {content_sha256!r}") from None


def assign_split(content_sha256: str, validation_fraction: float) -> Split:
    """`'validation'` for about `validation_fraction` of all contents, `'train'` for the rest; deterministic."""
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    return "validation" if split_position(content_sha256) < validation_fraction else "train"
