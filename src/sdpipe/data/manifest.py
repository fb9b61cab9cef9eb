"""The manifest: one Parquet row per accepted sample, written and read in batches (never whole in memory).

Columns: `path` (shown), `file` and `member` (how to read it back), `sha256` (of the stored bytes),
`pixel_sha256` (of the decoded pixels: identical pixels, identical hash), `phash` (64-bit perceptual hash,
hex), `width`, `height`, `mode` (original), `channels` (1 or 3 after conversion), `label`, `class_name`,
`caption`, `split`, `converted` (conversions applied, '; '-joined). The `dataset_id` is a hash of the
rows' content (pixels, label, caption, split), independent of file names and row order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.parquet"
REPORT = "report.json"
SOURCE_FILES = "source_files.parquet"

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("file", pa.string()),
        ("member", pa.string()),
        ("sha256", pa.string()),
        ("pixel_sha256", pa.string()),
        ("phash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("channels", pa.int8()),
        ("label", pa.int64()),
        ("class_name", pa.string()),
        ("caption", pa.string()),
        ("split", pa.string()),
        ("converted", pa.string()),
    ]
)
FILES_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64())])


class RowWriter:
    """Append rows (dicts) to a Parquet file, flushing every `batch` rows."""

    def __init__(self, path: Path, schema: pa.Schema = SCHEMA, batch: int = 2048) -> None:
        self.path, self.schema, self.batch = path, schema, batch
        self._writer = pq.ParquetWriter(path, schema)
        self._rows: list[dict[str, Any]] = []
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self.count += 1
        if len(self._rows) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        self.flush()
        self._writer.close()


def iter_rows(path: Path, columns: list[str] | None = None, batch: int = 4096) -> Iterator[dict[str, Any]]:
    """The rows of a manifest (or any Parquet file) one by one, read a batch at a time."""
    pf = pq.ParquetFile(path)
    for rb in pf.iter_batches(batch_size=batch, columns=columns):
        yield from rb.to_pylist()


def read_columns(path: Path, columns: list[str]) -> pa.Table:
    return pq.read_table(path, columns=columns)


class DatasetId:
    """Order-independent hash of manifest rows: the sum of per-row sha256 values modulo 2^256."""

    def __init__(self) -> None:
        self.total, self.count = 0, 0

    def add(self, row: dict[str, Any]) -> None:
        key = "\x1f".join(str(row[k]) for k in ("pixel_sha256", "label", "caption", "split"))
        self.total = (self.total + int.from_bytes(hashlib.sha256(key.encode()).digest(), "big")) % 2**256
        self.count += 1

    def hexdigest(self) -> str:
        h = hashlib.sha256(f"{self.count}:{self.total:064x}".encode()).hexdigest()
        return "sha256:" + h[:16]
