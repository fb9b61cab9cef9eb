"""Train/validation/test splits decided by content alone, so they survive renames, moves and added files.

A sample's split is a pure function of the sha256 of its content and the two fractions: the first 64 bits
of the hash, read as a number in [0, 1), fall below the validation fraction (validation), at or above
1 - the test fraction (test, the held-out part that training never sees and the judge compares with), or
between (train). Adding files never moves an existing sample to another split, and raising a fraction only
moves samples out of train. Identical contents always land in the same split.

`stratified_test` does the same for a set held in memory with labels (the embedded digits), exactly per
class: in each class the samples with the highest positions, about `test_fraction` of the class, are test.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")


def split_position(content_sha256: str) -> float:
    """Where a hash falls in [0, 1): its first 16 hex digits as a fraction (an optional 'sha256:' is ignored)."""
    digest = content_sha256.removeprefix("sha256:")
    try:
        return int(digest[:16], 16) / 2.0**64
    except ValueError:
        raise ValueError(f"not a hex sha256 digest: {content_sha256!r}") from None


def _check(name: str, fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {fraction}")


def assign_split(content_sha256: str, validation_fraction: float, test_fraction: float = 0.0) -> Split:
    """`'validation'` for about `validation_fraction` of all contents, `'test'` for about `test_fraction`,
    `'train'` for the rest; deterministic."""
    _check("validation_fraction", validation_fraction)
    _check("test_fraction", test_fraction)
    if validation_fraction + test_fraction > 1.0:
        raise ValueError(f"validation_fraction + test_fraction = {validation_fraction + test_fraction} exceeds 1")
    position = split_position(content_sha256)
    if test_fraction > 0 and position >= 1.0 - test_fraction:
        return "test"
    return "validation" if position < validation_fraction else "train"


def stratified_test(
    content_sha256: list[str], labels: np.ndarray, validation_fraction: float, test_fraction: float
) -> list[Split]:
    """Splits of a labelled set in memory: per class, the round(test_fraction * class size) samples with the
    highest hash positions are test (samples with the same content as the last one taken go with it, so a
    duplicate never straddles the cut); the rest split as `assign_split` does without a test fraction."""
    _check("test_fraction", test_fraction)
    positions = np.array([split_position(h) for h in content_sha256])
    splits: list[Split] = [assign_split(h, validation_fraction) for h in content_sha256]
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(test_fraction * len(members)))
        if k == 0:
            continue
        cut = np.sort(positions[members])[::-1][k - 1]  # the k-th highest position in the class
        for i in members[positions[members] >= cut]:
            splits[i] = "test"
    return splits
