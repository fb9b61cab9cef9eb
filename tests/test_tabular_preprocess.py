"""The table pre-processing (sdpipe.tabular.preprocess): encoded for a model, recorded, and reversible.

Each test guards one promise of docs/tables.md "Pre-processing": the round trip, the source's dtypes, valid
rows from any model output (ranges, category sets, rounding), missingness as data, the masks, save/load,
the two scalings, fitting on training rows only, new ids, derived datetime features, and errors naming the
column.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from sdpipe.tabular.config import TableDataConfig, TablePreprocessConfig
from sdpipe.tabular.preprocess import (
    EncodedTable,
    PreprocessError,
    TablePreprocessor,
    fit_preprocessor,
    table_frame,
)
from sdpipe.tabular.schema import Column, TypedTable, infer_schema
from sdpipe.tabular.sources import RawTable

N = 240
TYPES = {
    "customer_id": "id",
    "order_no": "id",
    "age": "integer",
    "income": "numeric",
    "height": "numeric",
    "city": "categorical",
    "size": "categorical",
    "member": "boolean",
    "vip": "boolean",
    "joined": "datetime",
    "comment": "text",
    "nothing": "empty",
}
NOT_MODELLED = ("customer_id", "order_no", "comment")  # decoded as new ids / all-missing text
BOTH = ["quantile", "standard"]


def typed(frame: pd.DataFrame, types: dict[str, str]) -> TypedTable:
    """A TypedTable as sdpipe.tabular.schema makes one, from a frame whose columns already have their types."""
    columns = [Column(name, types[name], "set in the test", "") for name in frame.columns]
    values = {name: frame[name].reset_index(drop=True) for name in frame.columns}
    return TypedTable(columns, values, {k: v.isna().to_numpy() for k, v in values.items()}, len(frame))


def with_missing(rng: np.random.Generator, values: list, share: float, marker: object = None) -> list:
    return [marker if rng.random() < share else v for v in values]


def mixed_frame(seed: int = 0, n: int = N) -> pd.DataFrame:
    """Every column type, with missing cells in some columns and none in others."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2021-03-01 08:00", tz="Europe/Paris")
    joined = [start + pd.Timedelta(hours=int(h)) for h in rng.integers(0, 24 * 900, n)]
    return pd.DataFrame(
        {
            "customer_id": [f"C-{i:04d}" for i in range(1, n + 1)],
            "order_no": pd.Series(rng.permutation(n) + 5000, dtype="int64"),
            "age": pd.Series(with_missing(rng, rng.integers(18, 91, n).tolist(), 0.1), dtype="Int64"),
            "income": pd.Series(with_missing(rng, np.round(rng.gamma(4, 120, n) + 10, 2).tolist(), 0.25, np.nan)),
            "height": np.round(rng.normal(172, 9, n), 1),
            "city": pd.Series(with_missing(rng, rng.choice(["Paris", "Lyon", "Nice", "Lille"], n).tolist(), 0.15)),
            "size": pd.Series([int(v) for v in rng.choice([36, 38, 40], n)], dtype=object),
            "member": pd.Series(with_missing(rng, (rng.random(n) < 0.3).tolist(), 0.2), dtype="boolean"),
            "vip": rng.random(n) < 0.1,
            "joined": pd.Series(with_missing(rng, joined, 0.1), dtype="datetime64[us, Europe/Paris]"),
            "comment": pd.Series([f"note {i} about the order" for i in range(n)], dtype=object),
            "nothing": pd.Series([None] * n, dtype=object),
        }
    )


@pytest.fixture(scope="module")
def source() -> pd.DataFrame:
    return mixed_frame()


@pytest.fixture(scope="module", params=BOTH)
def fitted(request: pytest.FixtureRequest, source: pd.DataFrame) -> TablePreprocessor:
    return fit_preprocessor(typed(source, TYPES), TablePreprocessConfig(numeric_scaling=request.param))


def model_output(pre: TablePreprocessor, n: int = 500, seed: int = 1) -> EncodedTable:
    """What an untrained model may give: wild numbers with NaN and infinities, indices out of range."""
    g = torch.Generator().manual_seed(seed)
    numeric = torch.randn(n, pre.numeric_width, generator=g) * 2
    numeric[0], numeric[1], numeric[2] = float("nan"), float("inf"), float("-inf")
    numeric[3:20] *= 1e4  # far outside every range
    categorical = torch.randint(-3, 30, (n, len(pre.category_sizes)), generator=g)
    return EncodedTable(numeric, categorical, pre.category_sizes)


def test_layout_is_as_documented(fitted: TablePreprocessor) -> None:
    assert fitted.numeric_names == ["age", "income", "height", "joined"]
    assert fitted.categorical_names == [
        "age:missing",
        "income:missing",
        "city",
        "size",
        "member",
        "vip",
        "joined:missing",
    ]
    assert fitted.category_sizes == [2, 2, 5, 3, 3, 2, 2]  # city: 4 + missing; member: False, True, missing
    spec = {c.name: c for c in fitted.columns}
    assert spec["city"].categories == ["Lille", "Lyon", "Nice", "Paris"]
    assert spec["member"].categories == [False, True]
    assert (spec["height"].missing, spec["vip"].has_missing) == (None, False)  # no missing cells: no indicator
    assert [c.role for c in fitted.columns if c.name in NOT_MODELLED + ("nothing",)] == ["id", "id", "none", "none"]


def test_round_trip_gives_the_source_back(fitted: TablePreprocessor, source: pd.DataFrame) -> None:
    encoded = fitted.encode(source)
    assert encoded.numeric.dtype == torch.float32 and encoded.categorical.dtype == torch.int64
    assert encoded.numeric.shape == (N, 4) and encoded.categorical.shape == (N, 7)
    decoded = fitted.decode(encoded)
    assert list(decoded.columns) == list(source.columns)
    assert dict(decoded.dtypes) == dict(source.dtypes)  # Int64, boolean, bool, datetime64[us, Europe/Paris] ...
    modelled = [c for c in source.columns if c not in NOT_MODELLED]
    pd.testing.assert_frame_equal(decoded[modelled], source[modelled])
    assert [type(v) for v in decoded["size"].unique()] == [int, int, int]  # the categories' Python type


def test_round_trip_of_an_inferred_csv_table() -> None:
    rng = np.random.default_rng(3)
    cities = ["Paris", "Lyon", "Nice", ""]
    cells = {
        "customer_id": [f"C-{1000 + i}" for i in range(120)],
        "age": [str(v) if rng.random() > 0.1 else "" for v in rng.integers(18, 90, 120)],
        "income": [f"{v:.2f}" if rng.random() > 0.2 else "NA" for v in rng.gamma(3, 300, 120)],
        "city": [cities[i] for i in rng.integers(0, 4, 120)],
        "member": [["yes", "no"][i] for i in rng.integers(0, 2, 120)],
        "joined": [f"2023-{m:02d}-{d:02d}T10:30:00+02:00" for m, d in rng.integers([1, 1], [13, 29], (120, 2))],
        "comment": [f"free text {i}, written by hand" for i in range(120)],
    }
    raw = RawTable(pd.DataFrame(cells, dtype=object), "csv", "t.csv")
    table = infer_schema(raw, TableDataConfig())
    assert [c.type for c in table.columns] == ["id", "integer", "numeric", "categorical", "boolean", "datetime", "text"]
    frame = table_frame(table)
    for scaling in BOTH:
        pre = fit_preprocessor(table, TablePreprocessConfig(numeric_scaling=scaling))
        decoded = pre.decode(pre.encode(frame))
        pd.testing.assert_frame_equal(
            decoded.drop(columns=["customer_id", "comment"]), frame.drop(columns=["customer_id", "comment"])
        )
        assert decoded["comment"].isna().all() and decoded["comment"].dtype == object  # text: not modelled


def test_any_model_output_decodes_to_valid_rows(fitted: TablePreprocessor, source: pd.DataFrame) -> None:
    decoded = fitted.decode(model_output(fitted))
    assert dict(decoded.dtypes) == dict(source.dtypes)
    for name in ("age", "income", "height", "joined"):  # ranges: inside the training values
        got, seen = decoded[name].dropna(), source[name].dropna()
        assert got.min() >= seen.min() and got.max() <= seen.max(), name
        assert got.nunique() > 3, name  # not all clipped to one bound
    assert (decoded["age"].dropna() % 1 == 0).all()
    assert np.array_equal(np.round(decoded["height"], 1), decoded["height"])  # rounding: the source's decimals
    assert np.array_equal(np.round(decoded["income"].dropna(), 2), decoded["income"].dropna())
    hours = decoded["joined"].dropna()
    assert (hours == hours.dt.floor("h")).all()  # datetimes: the source's resolution (whole hours)
    assert set(decoded["city"].dropna()) <= set(source["city"].dropna())  # category sets
    assert set(decoded["size"]) <= {36, 38, 40}
    assert decoded["height"].notna().all() and decoded["vip"].notna().all()  # no missing where training had none
    assert decoded["size"].notna().all()


def test_decode_rounds_float_indices_and_takes_nan_as_0(fitted: TablePreprocessor) -> None:
    out = model_output(fitted)
    near = out.categorical.double() + torch.where(torch.rand(out.categorical.shape) < 0.5, 0.4, -0.4)
    pd.testing.assert_frame_equal(
        fitted.decode(EncodedTable(out.numeric, near, out.category_sizes)), fitted.decode(out)
    )
    near[:] = float("nan")
    out.categorical[:] = 0
    pd.testing.assert_frame_equal(
        fitted.decode(EncodedTable(out.numeric, near, out.category_sizes)), fitted.decode(out)
    )


def test_more_digits_than_float32_holds_come_back_close() -> None:
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"x": np.round(rng.normal(1000, 300, 400), 6)})
    for scaling in BOTH:
        pre = fit_preprocessor(typed(frame, {"x": "numeric"}), TablePreprocessConfig(numeric_scaling=scaling))
        assert pre.columns[0].decimals == 6
        back = pre.decode(pre.encode(frame))["x"]
        assert np.abs(back - frame["x"]).max() < 1e-3  # float32 keeps ~7 significant digits of the scaled value
        assert np.array_equal(np.round(back, 6), back)


def test_missingness_is_data(fitted: TablePreprocessor, source: pd.DataFrame) -> None:
    decoded = fitted.decode(fitted.encode(source))
    for name in ("age", "income", "city", "member", "joined"):
        assert decoded[name].isna().mean() == source[name].isna().mean() > 0, name
    out = model_output(fitted)
    indicator = fitted.categorical_names.index("income:missing")
    out.categorical[:, indicator] = (torch.rand(out.rows, generator=torch.Generator().manual_seed(2)) < 0.3).long()
    decoded = fitted.decode(out)
    assert np.array_equal(decoded["income"].isna().to_numpy(), out.categorical[:, indicator].numpy() == 1)
    city = fitted.categorical_names.index("city")
    out.categorical[:, city] = 4  # the missing category
    assert fitted.decode(out)["city"].isna().all()


def test_masks_tell_observed_from_missing(fitted: TablePreprocessor, source: pd.DataFrame) -> None:
    encoded = fitted.encode(source)
    assert encoded.observed is not None and encoded.numeric_observed is not None
    assert encoded.categorical_observed is not None
    assert np.array_equal(encoded.observed.numpy(), source.notna().to_numpy())
    income = fitted.numeric_names.index("income")
    missing = source["income"].isna().to_numpy(copy=True)
    assert np.array_equal(encoded.numeric_observed[:, income].numpy(), ~missing)
    assert (encoded.numeric[missing, income] == 0).all()  # filled with 0 after scaling
    names = fitted.categorical_names
    assert np.array_equal(encoded.categorical_observed[:, names.index("city")].numpy(), source["city"].notna())
    assert encoded.categorical_observed[:, names.index("income:missing")].all()  # missingness itself is known


def test_a_missing_cell_training_never_had_is_encoded_unobserved(
    fitted: TablePreprocessor, source: pd.DataFrame
) -> None:
    frame = source.head(3).copy()
    frame.loc[0, "height"] = np.nan
    frame["size"] = pd.Series([None, 36, 38], dtype=object)
    encoded = fitted.encode(frame)
    assert encoded.numeric_observed is not None and encoded.categorical_observed is not None
    assert not encoded.numeric_observed[0, fitted.numeric_names.index("height")]
    assert encoded.numeric[0, fitted.numeric_names.index("height")] == 0
    size = fitted.categorical_names.index("size")
    assert encoded.categorical[0, size] == 0 and not encoded.categorical_observed[0, size]


@pytest.mark.parametrize("scaling", BOTH)
def test_save_and_load_decode_identically(scaling: str, source: pd.DataFrame, tmp_path) -> None:
    pre = fit_preprocessor(typed(source, TYPES), TablePreprocessConfig(numeric_scaling=scaling))
    pre.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preprocess.json", "preprocess.safetensors"]
    text = (tmp_path / "preprocess.json").read_text()
    assert "C-0001" not in text and "note 1 about" not in text  # training ids and texts are not recorded
    again = TablePreprocessor.load(tmp_path)
    assert [c.to_json() for c in again.columns] == [c.to_json() for c in pre.columns]
    out = model_output(pre)
    pd.testing.assert_frame_equal(again.decode(out), pre.decode(out))
    a, b = pre.encode(source), again.encode(source)
    assert torch.equal(a.numeric, b.numeric) and torch.equal(a.categorical, b.categorical)
    with pytest.raises(PreprocessError, match="no preprocess.json"):
        TablePreprocessor.load(tmp_path / "elsewhere")
    (tmp_path / "preprocess.safetensors").unlink()
    with pytest.raises(PreprocessError, match="needs preprocess.safetensors"):
        TablePreprocessor.load(tmp_path)
    json.loads(text)  # plain JSON, no pickle anywhere


def test_quantile_makes_numbers_normal_and_standard_keeps_their_shape() -> None:
    rng = np.random.default_rng(7)
    frame = pd.DataFrame({"x": np.round(rng.lognormal(3, 1, 3000), 3)})
    table = typed(frame, {"x": "numeric"})
    z = {
        s: fit_preprocessor(table, TablePreprocessConfig(numeric_scaling=s)).encode(frame).numeric[:, 0].double()
        for s in BOTH
    }
    skew = {s: float(((v - v.mean()) ** 3).mean() / v.std() ** 3) for s, v in z.items()}
    assert abs(skew["quantile"]) < 0.1 and skew["standard"] > 2  # lognormal: skewness about 6
    assert abs(float(z["standard"].mean())) < 1e-4 and abs(float(z["standard"].std()) - 1) < 1e-3
    assert float(z["quantile"].abs().max()) < 5.3  # sklearn clips the normal at about 5.2 standard deviations
    assert fit_preprocessor(table, TablePreprocessConfig()).arrays["quantiles"].shape == (100, 1)  # 3000 // 30
    assert fit_preprocessor(table, TablePreprocessConfig(quantiles=50)).arrays["quantiles"].shape == (50, 1)


def test_fitted_on_the_training_rows_only(source: pd.DataFrame) -> None:
    frame = source.copy()
    frame.loc[frame.index[-1], "height"] = 250.0  # a held-out row beyond every training value
    frame["city"] = frame["city"].astype(object)
    frame.loc[frame.index[-1], "city"] = "Brest"
    train = np.arange(len(frame)) < len(frame) - 1
    pre = fit_preprocessor(typed(frame, TYPES), rows=train)
    assert pre.rows == len(frame) - 1
    out = model_output(pre)
    out.numeric[:, pre.numeric_names.index("height")] = 1e4
    assert pre.decode(out)["height"].max() == frame["height"][train].max() < 250
    with pytest.raises(
        PreprocessError, match=r"column 'city': row 240 has 'Brest', a category the training rows never"
    ):
        pre.encode(frame)  # unseen categories are refused
    pre.encode(frame[train])


def test_new_ids_are_of_the_source_kind_and_never_training_ids(fitted: TablePreprocessor, source: pd.DataFrame) -> None:
    decoded = fitted.decode(model_output(fitted, n=50), id_start=0)
    assert decoded["customer_id"].tolist()[:2] == [f"C-{N + 1:04d}", f"C-{N + 2:04d}"]  # prefix and padding kept
    assert decoded["order_no"].tolist()[:2] == [5000 + N, 5001 + N] and decoded["order_no"].dtype == "int64"
    later = fitted.decode(model_output(fitted, n=50), id_start=50)
    for name in ("customer_id", "order_no"):
        ids = pd.concat([decoded[name], later[name]])
        assert ids.is_unique and not ids.isin(source[name]).any(), name
    uuids = pd.DataFrame({"uuid": [f"{i:08x}-0000-4000-8000-000000000000" for i in range(30)], "v": [1, 2] * 15})
    texts = pd.DataFrame({"ref": [f"r{i}x" for i in range(30)], "v": [1, 2] * 15})
    for frame, name, check in [
        (
            uuids,
            "uuid",
            lambda s: s.str.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}").all(),
        ),
        (texts, "ref", lambda s: s.tolist()[:2] == ["synthetic-1", "synthetic-2"]),
    ]:
        pre = fit_preprocessor(typed(frame, {name: "id", "v": "integer"}))
        got = pre.decode(pre.encode(frame))[name]
        assert check(got) and got.is_unique and not got.isin(frame[name]).any(), name


def test_datetime_features_are_derived_and_ignored_by_decode(source: pd.DataFrame) -> None:
    pre = fit_preprocessor(typed(source, TYPES), TablePreprocessConfig(datetime_features=["month", "weekday", "hour"]))
    names = pre.categorical_names
    assert names[-4:] == ["joined:missing", "joined:month", "joined:weekday", "joined:hour"]
    assert pre.category_sizes[-3:] == [12, 7, 24]
    encoded = pre.encode(source)
    present = source["joined"].notna().to_numpy(copy=True)
    local = source["joined"][present]  # in the column's own time zone (Europe/Paris)
    assert np.array_equal(encoded.categorical[present, names.index("joined:month")].numpy(), local.dt.month - 1)
    assert np.array_equal(encoded.categorical[present, names.index("joined:hour")].numpy(), local.dt.hour)
    assert np.array_equal(encoded.categorical[present, names.index("joined:weekday")].numpy(), local.dt.day_of_week)
    before = pre.decode(encoded)
    for feature in ("month", "weekday", "hour"):
        encoded.categorical[:, names.index(f"joined:{feature}")] = 0
    pd.testing.assert_frame_equal(pre.decode(encoded), before)


def test_errors_name_the_column(fitted: TablePreprocessor, source: pd.DataFrame) -> None:
    with pytest.raises(PreprocessError, match=r"no column 'income'"):
        fitted.encode(source.drop(columns=["income"]))
    bad = source.copy()
    bad["age"] = bad["age"].astype(object)
    bad.loc[3, "age"] = "unknown"
    with pytest.raises(PreprocessError, match=r"column 'age': row 4 has 'unknown', which is not a number"):
        fitted.encode(bad)
    bad = source.copy()
    bad.loc[5, "height"] = np.inf
    with pytest.raises(PreprocessError, match=r"column 'height': row 6 has inf, which is infinite"):
        fitted.encode(bad)
    bad = source.copy()
    bad["joined"] = bad["joined"].dt.tz_localize(None)
    with pytest.raises(PreprocessError, match=r"column 'joined': datetimes are datetime64\[us\]"):
        fitted.encode(bad)
    bad = source.copy()
    bad["member"] = bad["member"].astype(object).where(bad["member"].notna(), None)
    bad.loc[0, "member"] = "perhaps"
    with pytest.raises(PreprocessError, match=r"column 'member': row 1 has 'perhaps', a category"):
        fitted.encode(bad)
    encoded = fitted.encode(source)
    with pytest.raises(PreprocessError, match=r"numeric has shape \(240, 3\)"):
        fitted.decode(EncodedTable(encoded.numeric[:, :3], encoded.categorical, encoded.category_sizes))
    frame = pd.DataFrame({"when": [pd.Timestamp("2024-01-01"), None], "x": [1, 2]})
    with pytest.raises(PreprocessError, match=r"column 'when'.*Decimal"):
        from decimal import Decimal

        fit_preprocessor(typed(frame.assign(when=[Decimal(1), Decimal(2)]), {"when": "categorical", "x": "integer"}))


def test_settings_are_typed() -> None:
    with pytest.raises(ValidationError, match="bogus"):
        TablePreprocessConfig.model_validate({"bogus": 1})
    with pytest.raises(ValidationError, match="numeric_scaling"):
        TablePreprocessConfig.model_validate({"numeric_scaling": "minmax"})
    with pytest.raises(ValidationError, match="at most once"):
        TablePreprocessConfig(datetime_features=["month", "month"])
