"""Exact duplicates (identical pixels), leaks between splits, and near-duplicates (close perceptual hashes).

Works on compact per-row arrays (a 64-bit pixel key, a split code, a 64-bit perceptual hash), so memory
grows by a few bytes a sample. Of each group of identical pixels one row is kept: the first one of the
earliest split (train before validation before test). Copies in the same split are duplicates; copies in
another split are leaks, removed from that split.
"""

from __future__ import annotations

import numpy as np

SPLIT_RANK = {"train": 0, "validation": 1, "test": 2}
MAX_BUCKET = 5000  # near-duplicate buckets larger than this are not compared pairwise (reported)


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64: numpy 2's `bitwise_count`, or a byte table on numpy 1.x (which we support)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    as_bytes = np.ascontiguousarray(x, dtype=np.uint64).view(np.uint8).reshape(*x.shape, 8)
    return _BYTE_BITS[as_bytes].sum(axis=-1, dtype=np.uint8)


def split_code(split: str) -> int:
    return SPLIT_RANK.get(split, len(SPLIT_RANK))


def keepers(pixel_keys: np.ndarray, split_codes: np.ndarray) -> np.ndarray:
    """For each row, the index of the row kept for its pixels (itself when it is the one kept)."""
    n = len(pixel_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(n), split_codes, pixel_keys))
    sorted_keys = pixel_keys[order]
    starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    keep = np.empty(n, dtype=np.int64)
    keep[order] = order[first]
    return keep


def near_duplicate_groups(phashes: np.ndarray, max_bits: int) -> tuple[list[list[int]], int]:
    """Groups (row indices, each of 2+) whose perceptual hashes are within `max_bits` (<= 3) of each other,
    linked transitively; and the number of distinct hashes in buckets too large to compare.

    Rows with equal hashes are grouped directly; distinct hashes within 3 bits agree on at least one of their
    four 16-bit quarters (pigeonhole), so only hashes sharing a quarter are compared."""
    uniq, inverse = np.unique(phashes, return_inverse=True)
    roots, too_big = _linked(uniq, max_bits)
    row_roots = roots[inverse.reshape(-1)]
    order = np.argsort(row_roots, kind="stable")
    bounds = np.flatnonzero(np.r_[True, row_roots[order][1:] != row_roots[order][:-1], True])
    groups = [order[s:e].tolist() for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e - s > 1]
    return groups, too_big


def _linked(hashes: np.ndarray, max_bits: int) -> tuple[np.ndarray, int]:
    """For distinct hashes, the root of each one's group (union-find) and the count left uncompared."""
    n = len(hashes)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    too_big = 0
    for quarter in range(4):
        keys = (hashes >> np.uint64(16 * quarter)) & np.uint64(0xFFFF)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        bounds = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1], True])
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            if e - s < 2:
                continue
            if e - s > MAX_BUCKET:
                too_big += int(e - s)
                continue
            idx = order[s:e]
            h = hashes[idx]
            for j in range(len(idx) - 1):
                for k in np.flatnonzero(popcount(h[j] ^ h[j + 1 :]) <= max_bits):
                    a, b = root(int(idx[j])), root(int(idx[j + 1 + k]))
                    if a != b:
                        parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(n)], dtype=np.int64), too_big
