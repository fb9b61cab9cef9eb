"""Means with 95 % intervals over independent sample sets: no figure rests on one draw.

A figure measured on K independent sets of samples (set k takes seeds seed + k*n .. seed + (k+1)*n - 1) is
reported as its mean with the Student-t interval of that mean, and the K values themselves.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

# the figures every evaluation row summarizes over its sets, where present
SUMMARIZED = (
    "fd_ratio", "two_sample_accuracy", "near_copy_share", "label_accuracy", "frechet_distance",
    "fid", "kid_mean", "precision", "recall", "classifier_accuracy", "images_per_s",
)  # fmt: skip


def interval(values: list[float], confidence: float = 0.95) -> dict:
    """{mean, low, high, values}: the Student-t interval of the mean (low = high = mean for one value)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "low": mean, "high": mean, "values": v.tolist()}
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "values": v.tolist()}


def summarize(rows: list[dict]) -> dict:
    """One row for K sets' rows: the first set's row with each summarized figure replaced by its mean over
    the sets, and `intervals` holding each one's interval; `sets` and `seeds` say what was drawn."""
    out = dict(rows[0])
    out["intervals"] = {}
    for key in SUMMARIZED:
        if all(isinstance(r.get(key), (int, float)) for r in rows):
            out["intervals"][key] = interval([float(r[key]) for r in rows])
            out[key] = out["intervals"][key]["mean"]
    out["sets"] = len(rows)
    return out


def apart(a: dict, b: dict) -> bool:
    """Whether two intervals ({low, high}) do not overlap: a difference outside both intervals."""
    return bool(a["high"] < b["low"] or b["high"] < a["low"])


def fmt(iv: dict, digits: int = 2, percent: bool = False) -> str:
    """'2.14 (1.98-2.30)'; with `percent`, '99.3 % (98.9-99.6)'."""
    scale, unit = (100.0, " %") if percent else (1.0, "")
    m, lo, hi = (iv[k] * scale for k in ("mean", "low", "high"))
    return f"{m:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"
