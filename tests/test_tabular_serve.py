"""Table models in the registry and the server (issue 18, item 5): `sdpipe registry register` takes a table
model folder and `NAME@ALIAS` resolves to it (for `sdpipe generate` too); `POST /v1/generate` gives the rows
`sdpipe generate` writes (JSON or CSV, same seed same rows whatever n), `POST /v1/impute` fills rows; bad
requests are 422s naming the field."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sdpipe.cli import app
from sdpipe.serve.settings import ServeSettings
from sdpipe.serve.tables import table_app_for
from test_tabular_cli import TINY, _ok, _sets
from test_tabular_model import mixed_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd_fixtures import torch_threads

    root = tmp_path_factory.mktemp("table-serve")
    table = root / "t.csv"
    mixed_frame(100).to_csv(table, index=False)
    args = ["train", "--out", str(root / "run"), "--quiet", *_sets("data.source=table", f"data.path={table}")]
    with torch_threads(1):
        _ok(runner.invoke(app, [*args, *_sets(f"data.validated_dir={root / 'v'}", *TINY)]))
    return root / "run" / "model"


@pytest.fixture()
def client(model: Path) -> Any:
    served = table_app_for(str(model), None, "cpu", "float32", ServeSettings(max_n=4), None)
    assert served is not None
    served.state.holder.refresh()
    with TestClient(served) as c:
        yield c


def test_generate_returns_the_cli_rows_as_json_or_csv(client: Any, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.csv"
    _ok(runner.invoke(app, ["generate", "--model", str(model), "--n", "8", "--seed", "2", "--out", str(out)]))
    cli_rows = pd.read_csv(out)
    got = client.post("/v1/generate", json={"n": 8, "seed": 2})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["columns"] == list(cli_rows.columns)
    served = pd.DataFrame(body["rows"])
    pd.testing.assert_frame_equal(served.astype(str), cli_rows.astype(str).replace("nan", "None"))
    csv = client.post("/v1/generate", json={"n": 3, "seed": 2, "format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv")
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(csv.text)), cli_rows.iloc[:3])  # whatever n
    high = client.post("/v1/generate", json={"n": 4, "seed": 0, "condition": {"c": "high"}}).json()
    assert [r["c"] for r in high["rows"]] == ["high"] * 4


def test_bad_requests_are_422_naming_the_field(client: Any) -> None:
    def field(body: dict) -> list:
        got = client.post("/v1/generate", json=body)
        assert got.status_code == 422, got.text
        return [d["loc"][-1] for d in got.json()["detail"]]

    assert field({"n": 4 * 16 + 1}) == ["n"]  # max_n x 16 rows
    assert field({"n": 2, "format": "xml"}) == ["format"]
    assert field({"n": 2, "seed": -1}) == ["seed"]
    assert field({"n": 2, "colour": "red"}) == ["colour"]
    unknown = client.post("/v1/generate", json={"n": 2, "condition": {"nope": 1}})
    assert (
        unknown.status_code == 422 and "nope" in unknown.text and unknown.json()["detail"][0]["loc"][-1] == "condition"
    )
    too_many = client.post("/v1/impute", json={"rows": [{"a": 1.0}] * 65})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"][-1] == "rows"
    wrong = client.post("/v1/impute", json={"rows": [{"zzz": 1}]})
    assert wrong.status_code == 422 and "zzz" in wrong.text


def test_impute_fills_only_the_missing_cells(client: Any) -> None:
    frame = mixed_frame(6, seed=9)
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    rows[0]["b"], rows[1]["c"], rows[2]["k"] = None, None, None
    rows = [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()} for r in rows]
    got = client.post("/v1/impute", json={"rows": rows, "draws": 3, "seed": 1})
    assert got.status_code == 200, got.text
    body = got.json()
    for given, filled in zip(rows, body["rows"], strict=True):
        for name, value in given.items():
            if value is not None:
                assert filled[name] == pytest.approx(value) if isinstance(value, float) else filled[name] == value
            else:
                assert filled[name] is not None, name
    cells = {(c["row"], c["column"]) for c in body["cells"]}
    assert {(0, "b"), (1, "c"), (2, "k")} <= cells
    assert next(c for c in body["cells"] if c["column"] == "c")["shares"]


def test_registry_holds_a_table_model_and_alias_references_work(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDPIPE_REGISTRY_URL", f"sqlite:///{tmp_path / 'reg.db'}")
    _ok(runner.invoke(app, ["registry", "register", str(model), "--name", "tab"]))
    _ok(runner.invoke(app, ["registry", "alias", "tab", "prod", "1"]))
    out, direct = tmp_path / "ref.csv", tmp_path / "direct.csv"
    _ok(runner.invoke(app, ["generate", "--model", "tab@prod", "--n", "4", "--out", str(out)]))
    _ok(runner.invoke(app, ["generate", "--model", str(model), "--n", "4", "--out", str(direct)]))
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(direct))
    served = table_app_for("tab@prod", None, "cpu", "float32", ServeSettings(), None)
    assert served is not None
    served.state.holder.refresh()
    with TestClient(served) as c:
        assert c.get("/v1/model").json()["kind"] == "table"
        assert len(c.post("/v1/generate", json={"n": 2}).json()["rows"]) == 2
