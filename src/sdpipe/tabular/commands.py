"""What `sdpipe generate` and `sdpipe impute` do with a table model, and the loaded model they share with the
registry and the server.

    loaded = load_table(Path("runs/t1/model"))           # LoadedTable: the TableModel, its path and hash
    generate_file(loaded, "rows.csv", n=1000, seed=0, condition={"species": "Gentoo"})
    impute_file(loaded, "gaps.csv", "filled.csv", draws=20, seed=0)   # + filled.intervals.csv

Files are `.csv` or `.parquet` (by suffix), written to a temporary name beside the target and renamed into
place, so a file is whole or absent; an existing file is refused unless `overwrite`. Rows are the model's
`generate_rows` / `impute` (docs/table-models.md): row i takes seed S + i, so the same seed gives the same
rows whatever n.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpipe.config import MAX_SEED

if TYPE_CHECKING:
    import pandas as pd

    from sdpipe.tabular.generate import Imputation
    from sdpipe.tabular.sources import RawTable
    from sdpipe.tabular.train import TableModel

KIND = "table"
SUFFIXES = (".csv", ".parquet")
INTERVALS_SUFFIX = ".intervals.csv"


@dataclass
class LoadedTable:
    """A table model as `sdpipe.models.kinds.load_any` returns it: the model, where it is, and its hash
    (`sha256:` + the first 16 hex of the folder's content hash, as the registry records it)."""

    model: TableModel
    path: Path
    hash: str
    kind: str = KIND

    @property
    def columns(self) -> list[str]:
        return self.model.preprocessor.names


def is_table_model(path: str | Path) -> bool:
    """Whether `path` is a folder whose sdpipe.json says `"kind": "table"`."""
    meta = Path(path) / "sdpipe.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("kind") == KIND
    except (ValueError, OSError):
        return False


def folder_hash(path: Path) -> str:
    """The sha256 of a table model folder's files (names and bytes, sorted), as `identify` computes it."""
    from sdpipe.models import hashes

    return hashes.folder_sha256(path, ["."])


def load_table(path: str | Path, device: str = "cpu", dtype: str = "float32") -> LoadedTable:
    """The table model in `path` on `device` (float32 only)."""
    from sdpipe.tabular.train import load_table_model

    if dtype != "float32":
        raise ValueError(f"--dtype {dtype}: table models sample in float32")
    path = Path(path)
    return LoadedTable(load_table_model(path, device), path, "sha256:" + folder_hash(path)[:16])


def parse_conditions(items: list[str]) -> dict[str, Any]:
    """`--condition col=value` options as {column: value}; the value is read as YAML (so 3.5 is a number,
    true a boolean, a word a text; quote it to keep it text: col='"007"')."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--condition {item!r}: expected COLUMN=VALUE, e.g. --condition species=Gentoo")
        if name.strip() in out:
            raise ValueError(f"--condition {name.strip()!r} is given twice")
        try:
            out[name.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"--condition {item!r}: the value is not readable ({exc})") from None
    return out


def check_rows_file(path: Path, overwrite: bool, option: str = "--out") -> None:
    """A file to write rows to: a .csv or .parquet name, not a folder, not an existing file unless `overwrite`."""
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{option} {path}: a table model writes rows to a .csv or .parquet file")
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder: give a .csv or .parquet file name")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {path} exists: choose another name, or pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {path.parent} does not exist")


def check_seed(seed: int, count: int) -> None:
    """Seeds are 0..MAX_SEED and none of the `count` per-row seeds may pass it."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed {seed}: seeds are whole numbers from 0 to {MAX_SEED}")
    if seed + max(count, 1) - 1 > MAX_SEED:
        raise ValueError(f"--seed {seed}: its {count} row seeds go past {MAX_SEED}; lower --seed or --n")


def write_rows(frame: pd.DataFrame, path: Path) -> None:
    """`frame` as CSV or Parquet (by suffix), atomically: a temporary file beside it, then renamed."""
    tmp = path.with_name(f".{path.name}.writing")
    try:
        if path.suffix.lower() == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_rows(loaded: LoadedTable, path: Path) -> pd.DataFrame:
    """A .csv or .parquet file of rows to impute, typed as the model's training table was (its schema)."""
    from sdpipe.tabular.config import TableDataConfig
    from sdpipe.tabular.sources import load_table as read_table

    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"--input {path}: give a .csv or .parquet file")
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    return typed_rows(loaded, read_table(TableDataConfig(path=str(path))), f"--input {path}")


def rows_from_records(loaded: LoadedTable, records: list[dict[str, Any]]) -> pd.DataFrame:
    """JSON records (null: a missing cell) typed as the model's training table was."""
    import pandas as pd

    from sdpipe.tabular.sources import RawTable

    names = {str(k) for r in records for k in r}
    frame = pd.DataFrame.from_records(records, columns=[*loaded.columns, *sorted(names - set(loaded.columns))])
    frame = frame.astype(object).where(frame.notna(), None)
    return typed_rows(loaded, RawTable(frame=frame, format="json", source="rows"), "rows")


def typed_rows(loaded: LoadedTable, raw: RawTable, where: str) -> pd.DataFrame:
    """`raw`'s cells typed by the model's column types (`TableError` naming a cell that does not fit)."""
    from sdpipe.tabular.config import TableDataConfig
    from sdpipe.tabular.preprocess import table_frame
    from sdpipe.tabular.schema import infer_schema

    pre, frame = loaded.model.preprocessor, raw.frame
    missing = [c for c in pre.names if c not in frame.columns]
    extra = [str(c) for c in frame.columns if c not in pre.names]
    if missing or extra:
        parts = [f"lacks {missing}" if missing else "", f"has unknown columns {extra}" if extra else ""]
        raise ValueError(f"{where} {' and '.join(p for p in parts if p)}; the model's columns are {pre.names}")
    raw.frame = frame[pre.names]
    forced = {c.name: c.type for c in pre.columns}
    return table_frame(infer_schema(raw, TableDataConfig(), forced=forced))


def generate_frame(loaded: LoadedTable, n: int, seed: int, condition: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """`n` rows (row i: seed + i), every row carrying `condition`'s values when given."""
    from sdpipe.tabular.generate import generate_rows

    if n < 0:
        raise ValueError(f"--n {n}: a number of rows, 0 or more")
    check_seed(seed, n)
    return generate_rows(loaded.model, n, seed=seed, condition=dict(condition) if condition else None)


def generate_file(
    loaded: LoadedTable, out: Path, n: int, seed: int, condition: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """`generate_frame` written to `out` (checked with `check_rows_file` by the caller)."""
    frame = generate_frame(loaded, n, seed, condition)
    write_rows(frame, out)
    return frame


def impute_frame(loaded: LoadedTable, frame: pd.DataFrame, draws: int, seed: int) -> Imputation:
    """The model's `impute` with the seed range checked (draw k of row j: seed + j * draws + k)."""
    from sdpipe.tabular.generate import impute

    if draws < 1:
        raise ValueError(f"--draws {draws}: at least 1")
    check_seed(seed, len(frame) * draws)
    return impute(loaded.model, frame, draws=draws, seed=seed)


def intervals_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """The imputation's cells for a CSV: row (1-based, as in the input file), column, value, low, high
    (numbers: the 2.5 % and 97.5 % draws) and shares (categories: JSON {category: share of the draws})."""
    out = cells.copy()
    out["row"] = out["row"] + 1
    out["shares"] = [None if s is None else json.dumps({str(k): v for k, v in s.items()}) for s in out["shares"]]
    return out


def intervals_path(out: Path) -> Path:
    """FILLED.csv -> FILLED.intervals.csv (beside it, whatever the rows' format)."""
    return out.with_name(out.name[: -len(out.suffix)] + INTERVALS_SUFFIX)


def impute_file(loaded: LoadedTable, source: Path, out: Path, draws: int, seed: int) -> Imputation:
    """Fill the missing cells of `source` into `out`, and write `intervals_path(out)` (both atomically)."""
    frame = read_rows(loaded, source)
    result = impute_frame(loaded, frame, draws, seed)
    write_rows(result.frame, out)
    write_rows(intervals_frame(result.cells), intervals_path(out))
    return result


# --- the commands (sdpipe.cli calls these) ------------------------------------------------------------------------


def table_model_path(ref: str, url: str | None = None) -> tuple[Path, str | None] | None:
    """(folder, registry version or None) when `ref` (a path or registry reference) is a table model; None
    for anything else, or for a reference the registry does not know (the image path then says why)."""
    from sdpipe.registry import RegistryError, locate

    if Path(ref).exists():
        return (Path(ref), None) if is_table_model(ref) else None
    try:
        path, version = locate(ref, url)
    except (RegistryError, OSError, ValueError):
        return None
    return (path, version) if is_table_model(path) else None


def load_table_ref(
    found: tuple[Path, str | None], device: str = "cpu", dtype: str = "float32", url: str | None = None
) -> LoadedTable:
    """The table model `table_model_path` found; a registry version's files checked against its record."""
    path, version = found
    if version is not None:
        from sdpipe.registry import Registry

        Registry(url).verify(version)  # the stored files' content hash and sha256, as registered
    return load_table(path, device, dtype)


def generate_command(
    found: tuple[Path, str | None],
    out: Path,
    n: int,
    seed: int,
    conditions: list[str],
    overwrite: bool,
    device: str,
    dtype: str,
    image_options: list[str],
) -> str:
    """`sdpipe generate` for a table model: refuses image options (named), then writes `n` rows to `out`."""
    if image_options:
        raise ValueError(
            f"{found[0]} is a table model, which takes --n, --seed, --condition and --out FILE.csv|.parquet, "
            f"not {', '.join(image_options)}"
        )
    check_rows_file(out, overwrite)
    condition = parse_conditions(conditions)
    check_seed(seed, n)
    loaded = load_table_ref(found, device, dtype)
    frame = generate_file(loaded, out, n, seed, condition)
    return f"wrote {len(frame)} rows to {out}"


def impute_command(
    model: str, source: Path, out: Path, draws: int, seed: int, overwrite: bool, device: str = "cpu"
) -> str:
    """`sdpipe impute`: the checks, then `impute_file`; the line to print."""
    found = table_model_path(model)
    if found is None:
        from sdpipe.registry import resolve

        resolve(model)  # a reference the registry does not know says so
        raise ValueError(f"--model {model} is not a table model: impute fills tables (sdpipe.json kind table)")
    check_rows_file(out, overwrite)
    check_rows_file(intervals_path(out), overwrite, "the intervals file")
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the --input file: write the filled rows to another file")
    if draws < 1:
        raise ValueError(f"--draws {draws}: at least 1")
    loaded = load_table_ref(found, device)
    result = impute_file(loaded, source, out, draws, seed)
    return f"filled {len(result.cells)} cells into {out}; intervals in {intervals_path(out)}"
