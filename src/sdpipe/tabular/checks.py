"""What validation reports about a typed table: per column (missing values, constant, outliers, likely
personal data, a short profile) and per row (exact and near duplicates, leaks between splits and into a
held-out table). Nothing here changes the data; every finding is reported.

* **Outliers** (numeric and integer columns): a value x with |x - median| > k * s, where s = 1.4826 * MAD
  (the median absolute deviation, scaled to match the standard deviation of normal data) and k =
  `data.outlier_k` (default 3.5, Iglewicz and Hoaglin's modified z-score). When MAD is 0 (more than half
  the values equal), s = 1.2533 * the mean absolute deviation from the median; when that is 0 too, no
  value is an outlier. Infinite values are always outliers.
* **Constant**: at most one distinct non-missing value.
* **Personal data** (text, categorical and id columns): cells containing an e-mail address
  (`name@domain.tld`) or a phone number (9 to 15 digits, in groups separated by spaces, dots, dashes or
  parentheses, or written whole after a `+`; dates, decimals and IPv4 addresses are not phones). Any match
  is reported, with its count, share and rows; examples are masked.
* **Duplicates**: rows with the same `row_sha256` (every value equal); near duplicates: the same
  `content_sha256` (equal after normalisation, ids left out; sdpipe.tabular.hashing) but not exactly equal.
* **Leaks**: a validation or test row whose `content_sha256` equals a row of an earlier split (train <
  validation < test). Hash splits cannot make one (equal content, equal split); a `data.split_column` can.
  With a held-out table: each of its rows whose content equals a row of the table.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

LISTED = 1000  # groups, leaks or rows listed in the report (the counts are always complete)
ROWS_SHOWN = 20  # rows listed per column finding
SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
PHONE = re.compile(r"(?<![\w.+-])(?:\+\d[\d\s().-]{7,}\d|\(?\d[\d().-]*(?:[\s.-]+\(?\d[\d()]*)+)(?![\w.-])")
# not phones: dates, decimals (3.14159265358), IPv4 addresses
NOT_PHONE = re.compile(
    r".*(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{4}).*|\d+\.\d+|\d{1,3}(?:\.\d{1,3}){3}"
)
TEXT_TYPES = ("text", "categorical", "id")

Where = Callable[[int], Any]  # how a row is named in the report (its 1-based number)


def profile(kind: str, values: pd.Series, missing: np.ndarray) -> dict[str, Any]:
    """Counts and a short summary of one typed column."""
    present = values[~missing]
    n = len(values)
    out: dict[str, Any] = {
        "missing": int(missing.sum()),
        "missing_share": round(float(missing.mean()), 6) if n else 0.0,
        "distinct": int(present.nunique()),
    }
    out["constant"] = out["distinct"] <= 1
    if kind in ("numeric", "integer") and len(present):
        x = present.astype("float64").to_numpy()
        finite = x[np.isfinite(x)]
        out["infinite"] = int(len(x) - len(finite))
        if len(finite):
            med = float(np.median(finite))
            out.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()), median=med)
            out["mad"] = float(np.median(np.abs(finite - med)))
    elif kind == "datetime" and len(present):
        out.update(min=present.min().isoformat(), max=present.max().isoformat())
    elif kind in ("categorical", "boolean"):
        counts = present.astype(str).value_counts()
        out["top"] = {str(k): int(v) for k, v in counts.head(20).items()}
    elif kind in ("text", "id") and len(present):
        lengths = present.astype(str).str.len()
        out["length"] = {"min": int(lengths.min()), "median": float(lengths.median()), "max": int(lengths.max())}
    return out


def outliers(values: pd.Series, missing: np.ndarray, k: float, where: Where) -> dict[str, Any]:
    """Values far from the median by the robust rule in the module docstring."""
    x = values.astype("float64").to_numpy()
    finite = np.isfinite(x) & ~missing
    result: dict[str, Any] = {"rule": f"|x - median| > {k:g} * 1.4826 * MAD", "count": 0, "rows": []}
    if not finite.any():
        return result
    med = float(np.median(x[finite]))
    dev = np.abs(x[finite] - med)
    scale = 1.4826 * float(np.median(dev))
    if scale == 0:
        scale = 1.2533 * float(dev.mean())
        result["rule"] = f"|x - median| > {k:g} * 1.2533 * mean absolute deviation (MAD is 0)"
    if scale == 0:
        low, high = -np.inf, np.inf
    else:
        low, high = med - k * scale, med + k * scale
    bad = np.flatnonzero(~missing & (np.isinf(x) | (finite & ((x < low) | (x > high)))))
    result.update(
        low=None if scale == 0 else low,
        high=None if scale == 0 else high,
        count=int(len(bad)),
        share=round(len(bad) / max(int((~missing).sum()), 1), 6),
        rows=[{"row": where(int(i)), "value": float(x[i])} for i in bad[:ROWS_SHOWN]],
    )
    return result


def personal_data(values: pd.Series, missing: np.ndarray, where: Where) -> list[dict[str, Any]]:
    """E-mail addresses and phone numbers in a text column (one entry per kind found)."""
    found = []
    texts = values[~missing].astype(str)
    for kind, test in (("e-mail", _has_email), ("phone", _has_phone)):
        hits = texts[texts.map(test)]
        if len(hits):
            idx = [int(i) for i in hits.index[:ROWS_SHOWN]]
            found.append(
                {
                    "kind": kind,
                    "count": int(len(hits)),
                    "share": round(len(hits) / max(len(texts), 1), 6),
                    "rows": [where(i) for i in idx],
                    "examples": [mask(str(values.iloc[i])) for i in idx[:3]],
                }
            )
    return found


def _has_email(s: str) -> bool:
    return "@" in s and EMAIL.search(s) is not None


def _has_phone(s: str) -> bool:
    for m in PHONE.finditer(s):
        text = m.group(0)
        digits = sum(ch.isdigit() for ch in text)
        if 9 <= digits <= 15 and not NOT_PHONE.fullmatch(text):
            return True
    return False


def mask(s: str) -> str:
    """A value with its letters and digits hidden but the first of each word (for showing personal data)."""
    return re.sub(r"(?<=[A-Za-z0-9])[A-Za-z0-9]", "*", s[:80])


def duplicate_groups(keys: list[str]) -> list[list[int]]:
    """Groups (of row indices, in order) of rows sharing a key, for keys held by more than one row."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        rows[key].append(i)
    return [g for g in rows.values() if len(g) > 1]


def near_duplicate_groups(content: list[str], exact: list[str]) -> list[list[int]]:
    """Groups of rows equal after normalisation that are not all exactly equal."""
    return [g for g in duplicate_groups(content) if len({exact[i] for i in g}) > 1]


def split_leaks(content: list[str], splits: list[str], where: Where) -> list[dict[str, Any]]:
    """Rows whose normalised content already appears in an earlier split."""
    first: dict[str, int] = {}
    order = sorted(range(len(content)), key=lambda i: (SPLIT_ORDER.get(splits[i], 3), i))
    leaks = []
    for i in order:
        j = first.setdefault(content[i], i)
        if splits[j] != splits[i]:
            leaks.append({"row": where(i), "split": splits[i], "same_as": where(j), "same_as_split": splits[j]})
    return leaks


def heldout_leaks(
    heldout: list[str], content: list[str], splits: list[str], where: Where, heldout_where: Where
) -> list[dict[str, Any]]:
    """Rows of the held-out table whose normalised content equals a row of the table."""
    first: dict[str, int] = {}
    for i, key in enumerate(content):
        first.setdefault(key, i)
    leaks = []
    for i, key in enumerate(heldout):
        if key in first:
            j = first[key]
            leaks.append({"heldout_row": heldout_where(i), "row": where(j), "split": splits[j]})
    return leaks
