"""`sdpipe data validate`: read every sample of a source once, check it, and write what can be trusted.

Pass 1 streams the source's items through a pool of decode threads (in source order) and appends each
accepted sample to a partial manifest, keeping only a few bytes a sample in memory (pixel key, split,
perceptual hash). Then identical pixels are resolved (kept once; copies in another split are leaks,
removed from that split), near-duplicates grouped, and pass 2 streams the partial manifest into
DIR/manifest.parquet. DIR/report.json, DIR/report.html and DIR/source_files.parquet complete the output.
Every item seen ends up accepted, quarantined or skipped, with a reason for the last two.
"""

from __future__ import annotations

import hashlib
import os
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdpipe.config import DataConfig
from sdpipe.data.duplicates import keepers, near_duplicate_groups, split_code
from sdpipe.data.manifest import MANIFEST, DatasetId, RowWriter, iter_rows
from sdpipe.data.readers import Decoded, Rejected, array_pixels, decode_image
from sdpipe.data.sources import Item, SourceError, detect_kind, open_source
from sdpipe.data.splits import assign_split

LISTED = 1000  # converted files listed by name in the report (all are marked in the manifest)


@dataclass
class Outcome:
    item: Item
    status: str  # accepted | quarantined | skipped
    reason: str | None = None
    sha256: str | None = None
    pixel_sha256: str | None = None
    phash: int = 0
    decoded: Decoded | None = None


def read_file(path: str) -> bytes:
    """A file's bytes, or `Rejected` saying why it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError:
        raise Rejected("unreadable: permission denied") from None
    except OSError as exc:
        raise Rejected(f"unreadable ({exc.strerror or exc})") from None


def pixel_digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()


def perceptual_hash(pixels: np.ndarray) -> int:
    import imagehash
    from PIL import Image

    return int(str(imagehash.phash(Image.fromarray(pixels))), 16)


def inspect(item: Item, min_size: int, max_pixels: int) -> Outcome:
    """Read, hash and decode one item; never raises for bad input."""
    if item.skip:
        return Outcome(item, "skipped", item.skip)
    if item.problem:
        return Outcome(item, "quarantined", item.problem)
    sha = None
    try:
        if item.array is not None:
            arr = np.ascontiguousarray(item.array)
            sha = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode() + arr.tobytes()).hexdigest()
            decoded = array_pixels(arr, min_size)
        else:
            raw = item.data if item.data is not None else read_file(str(item.file))
            sha = hashlib.sha256(raw).hexdigest()
            decoded = decode_image(raw, min_size, max_pixels)
    except Rejected as exc:
        return Outcome(item, "quarantined", str(exc), sha256=sha)
    except Exception as exc:  # noqa: BLE001 - an unforeseen decoder failure quarantines, never crashes
        return Outcome(item, "quarantined", f"unexpected error reading it ({type(exc).__name__}: {exc})", sha)
    item.data = item.array = None  # the bytes are not needed any more
    return Outcome(item, "accepted", None, sha, pixel_digest(decoded.pixels), perceptual_hash(decoded.pixels), decoded)


def ordered_map(fn: Callable[[Item], Outcome], items: Iterable[Item], workers: int) -> Iterator[Outcome]:
    """`map(fn, items)` over a thread pool, in order, with a bounded number of items in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 8 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass
class _Pass1:
    """What pass 1 keeps in memory: a few bytes per accepted sample, and the rejected ones' reasons."""

    pixel_keys: array = field(default_factory=lambda: array("Q"))
    split_codes: array = field(default_factory=lambda: array("b"))
    phashes: array = field(default_factory=lambda: array("Q"))
    splits: list[str] = field(default_factory=list)
    files_seen: int = 0
    quarantined: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    converted: list[dict] = field(default_factory=list)  # the first LISTED; every one is in the manifest
    conversions: Counter = field(default_factory=Counter)  # how many of each kind of conversion
    converted_total: int = 0
    modes: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    caption_problems: list[dict] = field(default_factory=list)  # caption files that could not be read


def resolve_kind(source: str, cfg: DataConfig, kind: str | None) -> str:
    if kind:
        return kind
    if cfg.source != "digits":
        return cfg.source
    return detect_kind(source)


def validate(
    source: str, out: str | Path, cfg: DataConfig, kind: str | None = None, show_progress: bool = False
) -> dict[str, Any]:
    """Validate `source` into `out` (manifest.parquet, report.json, report.html, source_files.parquet);
    returns the report."""
    from sdpipe.data.captions import caption_section, load_tokenizer, manifest_batches
    from sdpipe.data.report import write_report
    from sdpipe.data.versioning import write_source_files

    start = time.perf_counter()
    kind = resolve_kind(source, cfg, kind)
    source = source if kind == "digits" else os.path.abspath(source)  # the manifest works from any folder
    out = Path(out)
    _check_out_dir(source, out)
    src = open_source(kind, source, cfg)
    if cfg.caption_tokenizer:
        load_tokenizer(cfg.caption_tokenizer)  # a bad folder fails now, not after reading every image
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)  # written last: no report, no trusted data
    partial = out / (MANIFEST + ".partial")
    state = _Pass1()
    writer = RowWriter(partial)
    workers = cfg.workers or os.cpu_count() or 1
    with _progress(show_progress) as tick:
        for outcome in ordered_map(lambda it: inspect(it, cfg.min_size, cfg.max_pixels), src.items, workers):
            _record(outcome, state, writer, cfg.validation_fraction, cfg.held_out_for(kind))
            tick()
    writer.close()
    class_names = src.class_names if src.class_names_after is None else src.class_names_after()
    report = _finish(partial, out, state, class_names, cfg.near_duplicate_bits)
    partial.unlink()
    report["captions"] = caption_section(
        manifest_batches(out / MANIFEST), cfg.caption_max_tokens, state.caption_problems, cfg.caption_tokenizer
    )
    report.update(
        source=str(source), kind=kind, image_column=src.image_column, validation_fraction=cfg.validation_fraction
    )
    report["config"] = cfg.model_dump(mode="json") | {"test_fraction": cfg.held_out_for(kind)}  # the share used
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["files_per_s"] = round(state.files_seen / max(report["seconds"], 1e-9), 1)
    write_source_files(kind, source, out)
    write_report(report, out)
    if not report["accepted"]:
        raise SourceError(
            f"{source}: no usable images ({state.files_seen} files seen, {len(state.quarantined)} quarantined, "
            f"{len(state.skipped)} skipped); the reasons are in {out / 'report.html'}"
        )
    return report


def _check_out_dir(source: str, out: Path) -> None:
    if source == "digits":
        return
    src, dst = Path(source).resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise SourceError(f"--out {out} is inside the source {source}: choose a folder outside it")


def _record(o: Outcome, state: _Pass1, writer: RowWriter, fraction: float, test_fraction: float) -> None:
    state.files_seen += 1
    if o.item.caption_problem:
        file, why = o.item.caption_problem
        image = None if file == o.item.path else o.item.path  # None: a problem of metadata.jsonl itself
        state.caption_problems.append({"path": file, "image": image, "reason": why})
    if o.status != "accepted":
        entry = {"path": o.item.path, "reason": o.reason}
        (state.skipped if o.status == "skipped" else state.quarantined).append(entry)
        return
    d, item = o.decoded, o.item
    assert d is not None and o.pixel_sha256 is not None
    split = item.split or assign_split(o.pixel_sha256, fraction, test_fraction)
    if d.notes:
        state.converted_total += 1
        if len(state.converted) < LISTED:
            state.converted.append({"path": item.path, "notes": d.notes})
        state.conversions.update(note.split(" (")[0] for note in d.notes)
    state.pixel_keys.append(int(o.pixel_sha256[:16], 16))
    state.split_codes.append(split_code(split))
    state.phashes.append(o.phash)
    if split not in state.splits:
        state.splits.append(split)
    state.modes[d.mode] += 1
    state.sizes[f"{d.width}x{d.height}"] += 1
    writer.add(
        {
            "path": item.path,
            "file": item.file,
            "member": item.member,
            "sha256": o.sha256,
            "pixel_sha256": o.pixel_sha256,
            "phash": f"{o.phash:016x}",
            "width": d.width,
            "height": d.height,
            "mode": d.mode,
            "channels": 1 if d.pixels.ndim == 2 else 3,
            "label": item.label,
            "class_name": None,
            "caption": item.caption,
            "split": split,
            "converted": "; ".join(d.notes),
        }
    )


def _finish(partial: Path, out: Path, state: _Pass1, class_names: list[str] | None, near_bits: int) -> dict[str, Any]:
    """Resolve duplicates and leaks, group near-duplicates, and write the final manifest (pass 2)."""
    keys = np.frombuffer(state.pixel_keys, dtype=np.uint64) if state.pixel_keys else np.zeros(0, np.uint64)
    codes = np.frombuffer(state.split_codes, dtype=np.int8) if state.split_codes else np.zeros(0, np.int8)
    keep = keepers(keys, codes)
    kept = np.flatnonzero(keep == np.arange(len(keep)))
    phashes = np.frombuffer(state.phashes, dtype=np.uint64) if state.phashes else np.zeros(0, np.uint64)
    near, too_big = near_duplicate_groups(phashes[kept], near_bits)
    near = [[int(kept[i]) for i in g] for g in near]
    removed = np.flatnonzero(keep != np.arange(len(keep)))
    wanted = {int(i) for i in removed} | {int(keep[i]) for i in removed} | {i for g in near for i in g}
    paths, splits = _paths_of(partial, wanted)

    dup_groups: dict[int, list[str]] = {}
    leaks = []
    for i in removed.tolist():
        k = int(keep[i])
        if splits[i] == splits[k]:
            dup_groups.setdefault(k, [paths[k]]).append(paths[i])
            state.skipped.append({"path": paths[i], "reason": f"duplicate: same pixels as {paths[k]}"})
        else:
            leaks.append({"path": paths[i], "split": splits[i], "same_as": paths[k], "same_as_split": splits[k]})
            state.skipped.append(
                {
                    "path": paths[i],
                    "reason": f"leak: same pixels as {splits[k]} sample {paths[k]}; removed from {splits[i]}",
                }
            )
    near_leaks = [[paths[i] for i in g] for g in near if len({splits[i] for i in g}) > 1]

    dataset_id, counts = _write_manifest(partial, out / MANIFEST, keep, class_names)
    accepted = int(len(kept))
    report = {
        "files_seen": state.files_seen,
        "accepted": accepted,
        "quarantined": state.quarantined,
        "skipped": state.skipped,
        "converted": state.converted,
        "converted_total": state.converted_total,
        "conversions": dict(state.conversions.most_common()),
        "duplicate_groups": list(dup_groups.values()),
        "leaks": leaks,
        "near_duplicate_groups": [[paths[i] for i in g] for g in near],
        "near_duplicate_leaks": near_leaks,
        "near_duplicate_bits": near_bits,
        "near_duplicate_unchecked": too_big,
        "class_names": class_names,
        "class_counts": counts["class"],
        "split_counts": counts["split"],
        "modes": dict(state.modes.most_common()),
        "sizes": dict(state.sizes.most_common(20)),
        "dataset_id": dataset_id,
    }
    assert report["files_seen"] == accepted + len(state.quarantined) + len(state.skipped), "accounting bug"
    return report


def _paths_of(partial: Path, wanted: set[int]) -> tuple[dict[int, str], dict[int, str]]:
    paths: dict[int, str] = {}
    splits: dict[int, str] = {}
    if not wanted:
        return paths, splits
    for i, row in enumerate(iter_rows(partial, ["path", "split"])):
        if i in wanted:
            paths[i], splits[i] = row["path"], row["split"]
    return paths, splits


def _write_manifest(
    partial: Path, final: Path, keep: np.ndarray, class_names: list[str] | None
) -> tuple[str, dict[str, dict]]:
    ident = DatasetId()
    by_class: Counter = Counter()
    by_split: Counter = Counter()
    writing = final.with_name(final.name + ".writing")  # renamed when complete: never a half manifest
    writer = RowWriter(writing)
    for i, row in enumerate(iter_rows(partial)):
        if keep[i] != i:
            continue
        if row["label"] is not None and class_names and 0 <= row["label"] < len(class_names):
            row["class_name"] = class_names[row["label"]]
            by_class[row["class_name"]] += 1
        by_split[row["split"]] += 1
        ident.add(row)
        writer.add(row)
    writer.close()
    os.replace(writing, final)
    counts = {"class": {n: by_class[n] for n in class_names} if class_names else {}, "split": dict(by_split)}
    return ident.hexdigest(), counts


class _progress:
    """A rich counter of files read (the total of a streamed source is not known in advance)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.n = enabled, 0

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from sdpipe.progress import console

        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("validating: {task.completed} files"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.bar.__enter__()
        self.task = self.bar.add_task("validate", total=None)
        return lambda: self.bar.update(self.task, advance=1)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(None, None, None)
