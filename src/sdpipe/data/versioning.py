"""Has the source changed since it was validated? Training must not use data nobody checked.

`sdpipe data validate` records every file of the source with its size and modification time in
DIR/source_files.parquet. `check_source_unchanged(DIR)` lists the source again and raises
`SourceChangedError` naming the files added, removed or changed (a changed stat is confirmed by the file's
sha256 when the manifest has it, so a mere `touch` or copy does not count), with the command to re-validate.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from sdpipe.data.manifest import FILES_SCHEMA, MANIFEST, REPORT, SOURCE_FILES, RowWriter, iter_rows

SHOW = 10  # changed files named in the error


class SourceChangedError(RuntimeError):
    """The source differs from what was validated; the message names the files and how to re-validate."""


def _shown(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def source_files(kind: str, source: str) -> Iterator[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file that makes up the source, in sorted order."""
    if kind == "digits":
        return
    root = Path(source)
    if root.is_file():
        st = root.stat()
        yield _shown(str(root)), st.st_size, st.st_mtime_ns
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:  # broken link, loop: its own (link) stat
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
            yield _shown(path), st.st_size, st.st_mtime_ns


def write_source_files(kind: str, source: str, out: Path) -> None:
    writer = RowWriter(out / SOURCE_FILES, FILES_SCHEMA)
    for path, size, mtime in source_files(kind, source):
        writer.add({"path": path, "size": size, "mtime_ns": mtime})
    writer.close()


def check_source_unchanged(validated_dir: str | Path) -> None:
    """Raise `SourceChangedError` if the source validated into `validated_dir` changed since."""
    out = Path(validated_dir)
    report_path = out / REPORT
    if not report_path.is_file():
        raise SourceChangedError(f"{out}: no {REPORT}; validate first: sdpipe data validate SOURCE --out {out}")
    report = json.loads(report_path.read_text())
    kind, source = report["kind"], report["source"]
    redo = f"re-validate with: sdpipe data validate {source} --out {out}"
    if kind == "digits":
        return
    if not Path(source).exists():
        raise SourceChangedError(f"the validated source {source} is gone; {redo}")
    recorded = {r["path"]: (r["size"], r["mtime_ns"]) for r in iter_rows(out / SOURCE_FILES)}
    added, changed = [], []
    for path, size, mtime in source_files(kind, source):
        before = recorded.pop(path, None)
        if before is None:
            added.append(path)
        elif before != (size, mtime):
            changed.append(path)
    removed = sorted(recorded)
    changed = _confirm_changed(changed, out) if changed and kind == "folder" else changed
    if added or removed or changed:
        parts = [
            f"{len(v)} {k}: {', '.join(v[:SHOW])}{' ...' if len(v) > SHOW else ''}"
            for k, v in (("added", added), ("removed", removed), ("changed", changed))
            if v
        ]
        raise SourceChangedError(f"the source {source} changed since it was validated ({'; '.join(parts)}); {redo}")


def _confirm_changed(paths: list[str], out: Path) -> list[str]:
    """Of files whose stat changed, those whose bytes differ from the manifest's sha256 (or are not in it)."""
    wanted = set(paths)
    known = {r["path"]: r["sha256"] for r in iter_rows(out / MANIFEST, ["path", "sha256"]) if r["path"] in wanted}
    really = []
    for p in paths:
        try:
            same = p in known and hashlib.sha256(Path(p).read_bytes()).hexdigest() == known[p]
        except OSError:
            same = False
        if not same:
            really.append(p)
    return really
