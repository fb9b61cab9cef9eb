"""Content-hash splits: deterministic, about the right share, stable when the fraction or the set changes."""

from __future__ import annotations

import hashlib

import pytest

from sdpipe.data.splits import assign_split


def _hashes(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def test_split_depends_only_on_the_hash_and_matches_the_fraction() -> None:
    hashes = _hashes(4000)
    first = [assign_split(h, 0.2) for h in hashes]
    assert first == [assign_split(h, 0.2) for h in hashes]
    share = first.count("validation") / len(first)
    assert 0.17 < share < 0.23
    assert assign_split("sha256:" + hashes[0], 0.2) == first[0]


def test_raising_the_fraction_only_moves_train_to_validation() -> None:
    hashes = _hashes(2000)
    low = [assign_split(h, 0.1) for h in hashes]
    high = [assign_split(h, 0.3) for h in hashes]
    assert all(b == "validation" for a, b in zip(low, high, strict=True) if a == "validation")
    assert high.count("validation") > low.count("validation")


def test_extremes_and_bad_input() -> None:
    h = _hashes(50)
    assert {assign_split(x, 0.0) for x in h} == {"train"}
    assert {assign_split(x, 1.0) for x in h} == {"validation"}
    with pytest.raises(ValueError, match="validation_fraction"):
        assign_split(h[0], 1.5)
    with pytest.raises(ValueError, match="not a hex"):
        assign_split("zz-not-hex", 0.5)
