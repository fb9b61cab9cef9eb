"""Table validation: type inference, the checks (missing, outliers, constant, personal data, duplicates, leaks),
splits by content, the manifest, report and dataset id, the source left untouched, and the command line."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sdpipe.tabular import TableConfigError, TableDataConfig, TableError, load_table_config, validate_table

runner = CliRunner()


def csv_file(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def run(path: Path, out: Path, **settings: Any) -> dict[str, Any]:
    return validate_table(TableDataConfig(path=str(path), **settings), out)


def column(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["schema"] if c["name"] == name)


def manifest(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def mixed_table(n: int = 40) -> pd.DataFrame:
    """One column of each type, n rows."""
    return pd.DataFrame(
        {
            "price": [round(10 + 0.37 * i, 2) for i in range(n)],
            "count": [i % 7 for i in range(n)],
            "colour": [["red", "green", "blue", "grey"][i % 4] for i in range(n)],
            "member": [["yes", "no"][i % 2] for i in range(n)],
            "flag": [i % 3 % 2 for i in range(n)],
            "joined": [f"2023-{1 + i % 12:02d}-{1 + i % 28:02d}" for i in range(n)],
            "note": [f"customer {i} said something" for i in range(n)],
            "code": [f"AB-{1000 + i}" for i in range(n)],
            "user_id": [(i * 37) % 101 for i in range(n)],  # distinct, not consecutive: an id by its name
            "serial": list(range(100, 100 + n)),  # distinct consecutive whole numbers
            "nothing": [None] * n,
        }
    )


EXPECTED = {
    "price": "numeric",
    "count": "integer",
    "colour": "categorical",
    "member": "boolean",
    "flag": "boolean",
    "joined": "datetime",
    "note": "text",
    "code": "id",
    "user_id": "id",
    "serial": "id",
    "nothing": "empty",
}


@pytest.mark.parametrize("fmt", ["csv", "parquet", "sqlite"])
def test_each_column_type_is_inferred_the_same_from_every_source(tmp_path: Path, fmt: str) -> None:
    frame = mixed_table()
    if fmt == "csv":
        cfg = TableDataConfig(path=str(csv_file(tmp_path / "t.csv", frame)))
    elif fmt == "parquet":
        frame.assign(joined=pd.to_datetime(frame.joined)).to_parquet(tmp_path / "t.parquet")
        cfg = TableDataConfig(path=str(tmp_path / "t.parquet"))
    else:
        with sqlite3.connect(tmp_path / "t.db") as con:
            frame.to_sql("t", con, index=False)
        con.close()
        cfg = TableDataConfig(db_url=f"sqlite:///{tmp_path}/t.db", sql="SELECT * FROM t")
    report = validate_table(cfg, tmp_path / "out")
    assert {c["name"]: c["type"] for c in report["schema"]} == EXPECTED
    assert all(c["reason"] for c in report["schema"])


def test_same_table_same_dataset_id_from_csv_parquet_and_sqlite(tmp_path: Path) -> None:
    frame = mixed_table().drop(columns=["nothing"])
    csv_id = run(csv_file(tmp_path / "t.csv", frame), tmp_path / "a")["dataset_id"]
    frame.assign(joined=pd.to_datetime(frame.joined)).to_parquet(tmp_path / "t.parquet")
    assert run(tmp_path / "t.parquet", tmp_path / "b")["dataset_id"] == csv_id
    with sqlite3.connect(tmp_path / "t.db") as con:
        frame.to_sql("t", con, index=False)
    con.close()
    cfg = TableDataConfig(db_url=f"sqlite:///{tmp_path}/t.db", sql="SELECT * FROM t")
    assert validate_table(cfg, tmp_path / "c")["dataset_id"] == csv_id


def test_type_rules_at_their_edges(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "whole_floats": ["1.0", "2.0", "3.0", "2.0", "1e3", "-4"],
            "sizes": ["S", "M", "10", "S", "M", "S"],  # mostly text: numbers-looking cells are text too
            "few": ["a", "b", "c", "d", "e", "f"],  # distinct words, no digits: free text, not categorical
            "words": ["True", "false", "TRUE", "False", "yes", "n"],
            "stamp": [
                "2024-05-01T10:00:00+02:00",
                "2024-05-02",
                "2024-05-03T01:02:03Z",
                "2024-05-04",
                "2024-06-01",
                "2024-06-02 08:00",
            ],
        }
    )
    plain = run(csv_file(tmp_path / "t.csv", frame), tmp_path / "o1")
    assert column(plain, "few")["type"] == "text"
    report = run(tmp_path / "t.csv", tmp_path / "out", column_types={"few": "categorical"})
    types = {c["name"]: c["type"] for c in report["schema"]}
    assert types == {"whole_floats": "integer", "sizes": "categorical", "few": "categorical", "words": "boolean",
                     "stamp": "datetime"}  # fmt: skip
    assert column(report, "few")["reason"] == "set in data.column_types"
    assert run(tmp_path / "t.csv", tmp_path / "o2", id_columns=["sizes"])["schema"][1]["type"] == "id"


def test_mixed_types_name_the_column_and_a_row_of_each_kind(tmp_path: Path) -> None:
    f = csv_file(tmp_path / "t.csv", pd.DataFrame({"age": ["34", "35", "unknown", "36", "2020-01-01"]}))
    with pytest.raises(TableError) as info:
        run(f, tmp_path / "out")
    msg = str(info.value)
    assert "column 'age' mixes types" in msg
    assert "number in row 1 (line 2): '34'" in msg and "text in row 3 (line 4): 'unknown'" in msg
    assert "datetime in row 5 (line 6): '2020-01-01'" in msg and "data.column_types.age=text" in msg
    assert column(run(f, tmp_path / "o", column_types={"age": "text"}), "age")["type"] == "text"
    with pytest.raises(TableError, match=r"column 'age' is integer but row 3 \(line 4\) has 'unknown'"):
        run(f, tmp_path / "o3", column_types={"age": "integer"})
    fixed = run(f, tmp_path / "o2", extra_na_values=["unknown", "2020-01-01"])
    assert column(fixed, "age")["type"] == "integer" and column(fixed, "age")["missing"] == 2
    with pytest.raises(TableError):
        run(f, tmp_path / "o2")  # a failed run into a validated folder takes its report away: not trusted now
    assert not (tmp_path / "o2" / "report.json").exists()


def test_missing_values_and_constant_columns(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": ["1", "", "NA", "4", "5", "n/a"], "same": ["x", "x", "", "x", "x", "x"]})
    report = run(csv_file(tmp_path / "t.csv", frame), tmp_path / "out")
    a = column(report, "a")
    assert (a["missing"], a["missing_share"], a["constant"]) == (3, 0.5, False)
    assert report["constant_columns"] == ["same"] and column(report, "same")["missing"] == 1
    assert report["missing_cells"] == 4


def test_outliers_by_median_and_mad(tmp_path: Path) -> None:
    values = [10 + (i % 5) * 0.1 for i in range(30)]
    values[4] = 1000.0
    zeros = [0] * 26 + [1, 1, 50, 0]  # MAD is 0: the mean absolute deviation takes its place
    report = run(csv_file(tmp_path / "t.csv", pd.DataFrame({"x": values, "z": zeros})), tmp_path / "out")
    x = column(report, "x")["outliers"]
    assert x["count"] == 1 and x["rows"] == [{"row": 5, "value": 1000.0}]
    assert x["rule"] == "|x - median| > 3.5 * 1.4826 * MAD"
    assert x["low"] == pytest.approx(10.2 - 3.5 * 1.4826 * 0.1) and x["high"] == pytest.approx(10.2 + 3.5 * 0.14826)
    z = column(report, "z")["outliers"]
    assert z["count"] == 1 and z["rows"][0]["row"] == 29 and "mean absolute deviation" in z["rule"]
    assert report["outlier_columns"] == {"x": 1, "z": 1}
    assert run(tmp_path / "t.csv", tmp_path / "o2", outlier_k=50000)["outlier_columns"] == {}


def test_likely_personal_data_is_found_and_never_copied_into_the_report(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "contact": ["jane.doe@example.com", "bob@mail.example.org", "", "no mail"],
            "note": ["call +44 20 7946 0958", "fine", "on 2024-05-01 at 10:30", "(415) 555-1234 evenings"],
            "amount": [4155551234, 2, 3, 4],  # numbers are not searched
            "plain": ["alpha", "beta", "gamma", "delta"],
            "log": ["shipped 2024-05-01 10 boxes", "pi is 3.14159265358", "host 192.168.100.200", "12 34"],
        }
    )
    report = run(csv_file(tmp_path / "t.csv", frame), tmp_path / "out")
    found = {(p["column"], p["kind"]): (p["count"], p["rows"]) for p in report["personal_data"]}
    assert found == {("contact", "e-mail"): (2, [1, 2]), ("note", "phone"): (2, [1, 4])}
    written = (tmp_path / "out" / "report.json").read_text() + (tmp_path / "out" / "report.html").read_text()
    assert "jane.doe@example.com" not in written and "7946 0958" not in written
    assert column(report, "contact")["personal_data"][0]["examples"][0] == "j***.d**@e******.c**"


def test_duplicates_and_near_duplicates_are_reported_and_marked(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "id": ["a1", "a2", "a3", "a4", "a5", "a6"],
            "city": ["Paris", "Lyon", "Paris", " paris ", "Nice", "Lyon"],
            "n": [1.0, 2.0, 1.0, 1.0000001, 3.0, 2.0],
        }
    )
    frame.loc[5, "id"] = "a2"  # row 6 repeats row 2 exactly (so the ids are not all distinct: named here)
    report = run(csv_file(tmp_path / "t.csv", frame), tmp_path / "out", id_columns=["id"])
    assert report["duplicate_rows"] == 1 and report["duplicate_groups"] == [[2, 6]]
    assert report["near_duplicate_groups"] == [[1, 3, 4]] and report["near_duplicate_rows"] == 2
    rows = manifest(tmp_path / "out")
    assert [r["duplicate_of"] for r in rows] == [None, None, None, None, None, 2]
    assert [r["near_duplicate_of"] for r in rows] == [None, None, 1, 1, None, None]
    assert len({rows[i]["split"] for i in (0, 2, 3)}) == 1  # near-identical rows never straddle splits


def test_leaks_between_given_splits_and_into_a_heldout_table(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "x": ["1", "2", "3", "1", "4"],
            "city": ["A", "B", "C", "a", "D"],
            "part": ["train", "train", "val", "TEST", "test"],
        }
    )
    held = csv_file(tmp_path / "held.csv", pd.DataFrame({"city": ["b ", "Z"], "x": ["2", "9"]}))
    report = run(csv_file(tmp_path / "t.csv", frame), tmp_path / "out", split_column="part", heldout_path=str(held))
    assert report["split_counts"] == {"train": 2, "validation": 1, "test": 2}
    assert report["leaks"] == [{"row": 4, "split": "test", "same_as": 1, "same_as_split": "train"}]
    assert report["heldout"]["leak_count"] == 1
    assert report["heldout"]["leaks"] == [{"heldout_row": 1, "row": 2, "split": "train"}]
    assert [r["leak"] for r in manifest(tmp_path / "out")] == [None, "heldout row 1", None, "train row 1", None]
    assert [c["name"] for c in report["schema"]] == ["x", "city"]  # the split column is not data
    bad = csv_file(tmp_path / "bad.csv", frame.assign(part=["train", "oops", "val", "test", "test"]))
    with pytest.raises(TableError, match=r"row 2 \(line 3\) has 'oops' in the split column 'part'"):
        run(bad, tmp_path / "o2", split_column="part")


def test_hash_splits_follow_content_and_stay_put_when_rows_are_added(tmp_path: Path) -> None:
    frame = pd.DataFrame({"v": [f"{i * 1.5}" for i in range(200)], "k": [f"key{i % 9}" for i in range(200)]})
    a = run(csv_file(tmp_path / "a.csv", frame), tmp_path / "a")
    assert set(a["split_counts"]) == {"train", "validation", "test"}
    assert 20 < a["split_counts"]["test"] < 65 and 5 < a["split_counts"]["validation"] < 40
    more = pd.concat([frame.iloc[::-1], pd.DataFrame({"v": ["999.5"], "k": ["new"]})])
    run(csv_file(tmp_path / "b.csv", more), tmp_path / "b")
    split_a = {r["content_sha256"]: r["split"] for r in manifest(tmp_path / "a")}
    split_b = {r["content_sha256"]: r["split"] for r in manifest(tmp_path / "b")}
    assert all(split_b[k] == v for k, v in split_a.items())
    twins = pd.DataFrame({"id": [f"r{i}" for i in range(80)], "name": [f"Item {i // 2}" for i in range(80)]})
    twins.loc[1::2, "name"] = twins.name[1::2].str.upper() + "  "  # each odd row: its even twin, shouted
    run(csv_file(tmp_path / "twins.csv", twins), tmp_path / "t", id_columns=["id"])
    pairs = [r["split"] for r in manifest(tmp_path / "t")]
    assert pairs[0::2] == pairs[1::2] and len(set(pairs)) == 3  # near-identical rows share a split
    salted = run(tmp_path / "a.csv", tmp_path / "c", split_salt="other")
    assert [r["split"] for r in manifest(tmp_path / "c")] != [r["split"] for r in manifest(tmp_path / "a")]
    assert salted["dataset_id"] != a["dataset_id"]


def test_dataset_id_stable_order_free_and_changed_by_one_cell(tmp_path: Path) -> None:
    frame = mixed_table(30)
    first = run(csv_file(tmp_path / "t.csv", frame), tmp_path / "a")["dataset_id"]
    assert run(tmp_path / "t.csv", tmp_path / "b")["dataset_id"] == first
    assert run(csv_file(tmp_path / "r.csv", frame.iloc[::-1]), tmp_path / "c")["dataset_id"] == first
    for col, value in (("price", 10.01), ("colour", "Red"), ("joined", "2023-01-02"), ("serial", 99)):
        changed = frame.copy()
        changed.loc[0, col] = value
        other = run(csv_file(tmp_path / "x.csv", changed), tmp_path / "x")["dataset_id"]
        assert other != first, col
    assert (
        run(csv_file(tmp_path / "y.csv", frame.rename(columns={"note": "notes"})), tmp_path / "y")["dataset_id"]
        != first
    )


def test_outputs_and_the_source_untouched(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    mixed_table(20).iloc[:10].to_parquet(tmp_path / "src" / "a.parquet")
    mixed_table(20).iloc[10:].to_parquet(tmp_path / "src" / "b.parquet")
    before = _tree(tmp_path / "src")
    report = run(tmp_path / "src", tmp_path / "out")
    assert _tree(tmp_path / "src") == before
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"manifest.parquet", "schema.json", "report.json", "report.html", "source_files.parquet"}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["dataset_id"] == report["dataset_id"]
    schema = json.loads((tmp_path / "out" / "schema.json").read_text())
    assert schema["dataset_id"] == report["dataset_id"] and schema["columns"][0] == {
        "name": "price", "type": "numeric", "storage": "double"
    }  # fmt: skip
    rows = manifest(tmp_path / "out")
    assert [r["row"] for r in rows] == list(range(1, 21)) and rows[10]["file"].endswith("b.parquet")
    html = (tmp_path / "out" / "report.html").read_text()
    assert report["dataset_id"] in html and "<td><code>user_id</code></td><td>id</td>" in html
    with pytest.raises(TableError, match="inside the source"):
        run(tmp_path / "src", tmp_path / "src" / "out")
    from sdpipe.data.versioning import SourceChangedError, check_source_unchanged

    check_source_unchanged(tmp_path / "out")
    mixed_table(3).to_parquet(tmp_path / "src" / "c.parquet")
    with pytest.raises(SourceChangedError, match="1 added"):
        check_source_unchanged(tmp_path / "out")


def _tree(root: Path) -> dict[str, tuple[str, int, int]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    } | {"names": (",".join(sorted(str(p) for p in root.rglob("*"))), 0, 0)}


def test_config_is_typed_and_errors_name_the_key() -> None:
    cfg = load_table_config({"test_fraction": 0.3, "column_types": {"zip": "categorical"}})
    assert cfg.test_fraction == 0.3 and cfg.validation_fraction == 0.1 and cfg.outlier_k == 3.5
    for values, needle in (
        ({"bogus": 1}, "data.bogus: unknown key"),
        ({"test_fraction": 0.6, "validation_fraction": 0.5}, "must leave a training split"),
        ({"encoding": "klingon"}, "data.encoding: unknown encoding 'klingon'"),
        ({"column_types": {"a": "float"}}, "data.column_types.a"),
        ({"db_url": "sqlite:///x.db"}, "db_url and sql go together"),
        ({"delimiter": ";;"}, "one character"),
    ):
        with pytest.raises(TableConfigError, match=needle):
            load_table_config(values)


# -- the command line -------------------------------------------------------------------------------------------


def cli(*args: str) -> Any:
    from sdpipe.cli import app

    return runner.invoke(app, ["data", "validate", *args, "--quiet"])


def test_cli_validates_a_csv_and_a_query_and_strict_fails_on_findings(tmp_path: Path) -> None:
    f = csv_file(tmp_path / "t.csv", mixed_table(30))
    result = cli(str(f), "--out", str(tmp_path / "a"), "--set", "data.test_fraction=0.3")
    assert result.exit_code == 0, result.output
    assert "30 rows x 11 columns" in result.output and "dataset_id sha256:" in result.output
    assert json.loads((tmp_path / "a" / "report.json").read_text())["test_fraction"] == 0.3
    with sqlite3.connect(tmp_path / "t.db") as con:
        mixed_table(30).to_sql("t", con, index=False)
    con.close()
    result = cli(
        "--db", f"sqlite:///{tmp_path}/t.db", "--sql", "SELECT price, colour FROM t", "--out", str(tmp_path / "b")
    )
    assert result.exit_code == 0 and "30 rows x 2 columns" in result.output, result.output
    dup = csv_file(tmp_path / "d.csv", pd.DataFrame({"a": [1, 1, 2], "b": ["x", "x", "y"]}))
    assert cli(str(dup), "--out", str(tmp_path / "c")).exit_code == 0
    result = cli(str(dup), "--out", str(tmp_path / "c"), "--strict")
    assert result.exit_code == 1 and "1 duplicate rows" in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{tmp}/r.csv"], "row 1 (line 2) has 1 fields, expected 2"),
        (["{tmp}/none.csv"], "{tmp}/none.csv: no such file or folder"),
        (["--db", "sqlite:///{tmp}/t.db"], "--db and --sql go together"),
        (["--db", "sqlite:///{tmp}/nope.db", "--sql", "SELECT 1"], "no SQLite database file"),
        (["{tmp}/r.csv", "--set", "train.steps=3"], "data.* settings only"),
        (["{tmp}/r.csv", "--set", "data.max_categories=1"], "data.max_categories"),
        (["{tmp}/photos", "--heldout", "{tmp}/r.csv"], "--heldout is for tables"),
    ],
)
def test_cli_table_errors_exit_2_with_one_error_line(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "r.csv").write_text("a,b\n1\n")
    (tmp_path / "photos").mkdir()
    result = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], "--out", str(tmp_path / "v"))
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")]
    assert needle.replace("{tmp}", str(tmp_path)) in " ".join(result.output.split()).replace("\n", "")
    assert "Traceback" not in result.output


def test_cli_keeps_image_parquet_on_the_image_validator(tmp_path: Path) -> None:
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    pq.write_table(pa.table({"img": [{"bytes": png(s), "path": None} for s in range(3)]}), tmp_path / "i.parquet")
    result = cli(str(tmp_path / "i.parquet"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kind"] == "parquet" and report["accepted"] == 3
    result = cli(str(tmp_path / "i.parquet"), "--out", str(tmp_path / "o2"), "--kind", "table")
    assert result.exit_code == 2 and "holds binary data" in result.output
