"""Table sources read with Hugging Face `datasets`: a dataset saved with `save_to_disk` (memory-mapped Arrow)
and Parquet files with an image column (streamed). Images are taken as undecoded bytes
(`datasets.Image(decode=False)`) so that validation checks and hashes the stored file itself.

`TableReader` gives one row's image bytes back by index, for training.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdpipe.data.sources import SEP, Item, Source, SourceError, decode_caption, files_under

BATCH = 256


def _image_column(features: Any, wanted: str | None, where: str) -> str:
    import datasets

    if wanted:
        if wanted not in features:
            raise SourceError(f"{where}: no column {wanted!r} (columns: {', '.join(features)}); fix data.image_column")
        return wanted
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name, feature in features.items():
        if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
            return name
        if isinstance(feature, dict) and "bytes" in feature:  # {bytes, path} written without HF metadata
            return name
    raise SourceError(f"{where}: no image column among {', '.join(features)}; set data.image_column")


def _undecoded(ds: Any, column: str) -> Any:
    import datasets

    if isinstance(ds.features[column], datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _columns(features: Any, cfg: Any, where: str) -> tuple[str, str | None, str | None]:
    image = _image_column(features, cfg.image_column, where)
    label = cfg.label_column or ("label" if "label" in features else None)
    if label and label not in features:
        raise SourceError(f"{where}: no column {label!r}; fix data.label_column")
    caption = cfg.caption_column or next((c for c in ("text", "caption") if c in features), None)
    if caption and caption not in features:
        raise SourceError(f"{where}: no column {caption!r} (columns: {', '.join(features)}); fix data.caption_column")
    return image, label, caption


def _class_names(feature: Any, values: list[Any] | None) -> list[str] | None:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if values is None:
        return None
    if all(isinstance(v, int) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values)


def image_bytes(value: Any) -> bytes | None:
    """The stored bytes of an image cell: `{'bytes', 'path'}` (datasets.Image) or raw binary."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
        return b""
    return value if isinstance(value, bytes) else None


def _row_item(
    shown: str, file: str, member: str, row: dict, cols: tuple[str, str | None, str | None], names: Any
) -> Item:
    image, label_col, caption_col = cols
    data = image_bytes(row[image])
    if data is None:
        return Item(path=shown, problem=f"column {image!r} holds {type(row[image]).__name__}, not image bytes")
    label = None
    value = row[label_col] if label_col is not None else None
    if isinstance(names, dict):
        label = names.get(str(value))
    elif isinstance(value, int):
        label = value
    caption, problem = _cell_caption(row.get(caption_col) if caption_col else None)
    item = Item(path=shown, file=file, member=member, data=data, label=label, caption=caption)
    item.caption_problem = (f"{shown}[{caption_col}]", problem) if problem else None
    return item


def _cell_caption(value: Any) -> tuple[str | None, str | None]:
    """A caption cell as text: strings as they are, bytes decoded as UTF-8 (never with U+FFFD)."""
    if value is None:
        return None, None
    if isinstance(value, bytes):
        return decode_caption(value)
    return str(value), None


def _rows(ds: Any, columns: list[str]) -> Iterator[dict]:
    for batch in ds.select_columns(columns).iter(batch_size=BATCH):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            yield dict(zip(keys, values, strict=True))


def _label_lookup(names: list[str] | None, feature: Any) -> Any:
    """int labels index directly; string labels go through a name -> index dict."""
    import datasets

    if names is None or isinstance(feature, datasets.ClassLabel):
        return names
    if isinstance(feature, datasets.Value) and feature.dtype.startswith("int"):
        return names
    return {n: i for i, n in enumerate(names)}


def open_hf(path: str, cfg: Any) -> Source:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a saved dataset"
        raise SourceError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    parts = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    first = parts[0][1]
    cols = _columns(first.features, cfg, path)
    feature = first.features[cols[1]] if cols[1] else None
    values = None
    if cols[1] and not isinstance(feature, datasets.ClassLabel):
        values = sorted({v for _, d in parts for v in d.unique(cols[1]) if v is not None}, key=str)
    names = _class_names(feature, values) if cols[1] else None
    lookup = _label_lookup(names, feature)

    def items() -> Iterator[Item]:
        for split, ds in parts:
            ds = _undecoded(ds, cols[0])
            for i, row in enumerate(_rows(ds, [c for c in cols if c])):
                member = f"{split}/{i}" if split else str(i)
                item = _row_item(f"{path}{SEP}{member}", path, member, row, cols, lookup)
                item.split = {"val": "validation", "valid": "validation"}.get(split or "", split)
                yield item

    return Source("hf", path, names, items(), image_column=cols[0])


def open_parquet(path: str, cfg: Any) -> Source:
    import datasets

    files = files_under(path, (".parquet",))
    if not files:
        raise SourceError(f"{path}: no .parquet files found")
    try:
        first = datasets.load_dataset("parquet", data_files=[str(files[0])], split="train", streaming=True)
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"{files[0]}: not a readable Parquet file ({exc})") from None
    features = first.features
    cols = _columns(features, cfg, str(files[0]))
    feature = features[cols[1]] if cols[1] else None
    names = _class_names(feature, None) if cols[1] and isinstance(feature, datasets.ClassLabel) else None
    if cols[1] and names is None:
        names = _parquet_label_names(files, cols[1])
    lookup = _label_lookup(names, feature)

    def items() -> Iterator[Item]:
        for f in files:
            try:
                ds = datasets.load_dataset("parquet", data_files=[str(f)], split="train", streaming=True)
                for i, row in enumerate(_rows(_undecoded(ds, cols[0]), [c for c in cols if c])):
                    yield _row_item(f"{f}{SEP}{i}", str(f), str(i), row, cols, lookup)
            except Exception as exc:  # noqa: BLE001 - a broken file is quarantined, never a crash
                yield Item(path=str(f), problem=f"unreadable Parquet file ({type(exc).__name__}: {exc})")

    return Source("parquet", path, names, items(), image_column=cols[0])


def _parquet_label_names(files: list[Path], column: str) -> list[str]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    values: set = set()
    for f in files:
        values.update(v for v in pc.unique(pq.read_table(f, columns=[column])[column]).to_pylist() if v is not None)
    return _class_names(None, sorted(values, key=str)) or []


class TableReader:
    """Random access to one row's image bytes of an hf or parquet source (for training)."""

    def __init__(self, kind: str, path: str, image_column: str | None) -> None:
        self.kind, self.path, self.image_column = kind, path, image_column
        self._hf: dict[str | None, Any] = {}
        self._groups: dict[str, tuple[Any, list[int]]] = {}
        self._cached: tuple[str, int, Any] | None = None

    def read(self, file: str, member: str) -> bytes:
        data = self._read_hf(member) if self.kind == "hf" else self._read_parquet(file, int(member))
        if data is None:
            raise FileNotFoundError(f"{file}{SEP}{member}: no image bytes; re-run sdpipe data validate")
        return data

    def _read_hf(self, member: str) -> bytes | None:
        import datasets

        split, _, index = member.rpartition("/")
        key = split or None
        if key not in self._hf:
            loaded = datasets.load_from_disk(self.path)
            ds = loaded[key] if key is not None else loaded
            column = _image_column(ds.features, self.image_column, self.path)
            self._hf[key] = (_undecoded(ds, column), column)
        ds, column = self._hf[key]
        return image_bytes(ds[int(index)][column])

    def _read_parquet(self, file: str, row: int) -> bytes | None:
        import pyarrow.parquet as pq

        if file not in self._groups:
            pf = pq.ParquetFile(file)
            starts = [0]
            for g in range(pf.num_row_groups):
                starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
            self._groups[file] = (pf, starts)
        pf, starts = self._groups[file]
        group = max(g for g in range(len(starts) - 1) if starts[g] <= row)
        if self._cached is None or self._cached[:2] != (file, group):
            names = pf.schema_arrow.names
            column = self.image_column or _first_binary(pf)
            if column not in names:
                raise FileNotFoundError(f"{file}: no column {column!r}")
            self._cached = (file, group, pf.read_row_group(group, columns=[column]).column(0))
        return image_bytes(self._cached[2][row - starts[group]].as_py())


def _first_binary(pf: Any) -> str:
    import pyarrow as pa

    for f in pf.schema_arrow:
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_struct(f.type):
            return f.name
    raise FileNotFoundError(f"{pf}: no image column")
