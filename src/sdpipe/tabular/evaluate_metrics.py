"""The figures of a table evaluation (issue 18, item 6), each computed on one set of rows; `evaluate.py`
draws the sets and reports each figure as a mean with a 95 % interval over them.

* `quality` (SDMetrics' Quality Report: column shapes, column pair trends) and `privacy` (SDMetrics' DCR
  overfitting and baseline protection) need the optional `sdmetrics` package (imported here on first use;
  without it they are reported as skipped);
* `detection` (a classifier two-sample test), `efficacy` (train on synthetic, test on real, beside train on
  real) and the imputation baselines (`baseline_fill`: mean/mode, k-NN, iterative MICE) use scikit-learn.

Columns are "numerical", "categorical" or "datetime" (`Kinds`); every model runs with a fixed random state.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

Kinds = dict[str, str]  # column -> "numerical" | "categorical" | "datetime"

SDMETRICS_MISSING = "skipped: pip install sdmetrics (0.32)"
FOLDS = 5  # cross-validation folds of the two-sample test
MAX_CATEGORIES = 250  # a category column with more values is coded as a number for the classifiers


def sdmetrics_version() -> str | None:
    """The installed sdmetrics version, or None when it cannot be imported."""
    try:
        import sdmetrics
    except ImportError:
        return None
    return str(sdmetrics.__version__)


def infer_kinds(frame: pd.DataFrame) -> Kinds:
    """Kinds from dtypes: numbers (not booleans) numerical, datetimes datetime, everything else categorical."""
    import pandas as pd

    out: Kinds = {}
    for name in frame.columns:
        dtype = frame[name].dtype
        if pd.api.types.is_datetime64_any_dtype(dtype):
            out[str(name)] = "datetime"
        elif pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
            out[str(name)] = "numerical"
        else:
            out[str(name)] = "categorical"
    return out


def _for_sdmetrics(frame: pd.DataFrame, kinds: Kinds) -> pd.DataFrame:
    """Categories as strings (missing stays missing), numbers as floats: one dtype per column everywhere."""
    out = frame[list(kinds)].copy()
    for name, kind in kinds.items():
        if kind == "categorical":
            col = out[name].astype(object)
            out[name] = col.where(col.isna(), col.astype(str)).astype(object)
        elif kind == "numerical":
            out[name] = out[name].astype("float64")
    return out


def sdmetrics_metadata(kinds: Kinds) -> dict[str, Any]:
    return {"columns": {name: {"sdtype": kind} for name, kind in kinds.items()}}


def quality(real: pd.DataFrame, synthetic: pd.DataFrame, kinds: Kinds) -> dict[str, Any]:
    """SDMetrics' Quality Report (the unified `sdmetrics.reports` API, one table "t"): its score, Column Shapes
    and Column Pair Trends (0-1, higher is closer to `real`), with the real-data thresholds it applied."""
    from sdmetrics.reports import QualityReport

    report = QualityReport()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report.generate(
            {"t": _for_sdmetrics(real, kinds)},
            {"t": _for_sdmetrics(synthetic, kinds)},
            {"tables": {"t": sdmetrics_metadata(kinds)}},
            verbose=False,
        )
    props = report.get_properties().set_index("Property")["Score"]
    return {
        "quality_score": float(report.get_score()),
        "column_shapes": float(props["Column Shapes"]),
        "column_pair_trends": float(props.get("Column Pair Trends", np.nan)),
        "thresholds": {
            "real_correlation_threshold": float(getattr(report, "real_correlation_threshold", np.nan)),
            "real_association_threshold": float(getattr(report, "real_association_threshold", np.nan)),
        },
        "per_column": {
            str(r["Column"]): float(r["Score"]) for r in report.get_details("Column Shapes").to_dict("records")
        },
    }


def privacy(train: pd.DataFrame, synthetic: pd.DataFrame, heldout: pd.DataFrame, kinds: Kinds) -> dict[str, Any]:
    """SDMetrics' distance to closest record (per column |d|/range capped at 1, categories 0/1, averaged):
    `closer_to_training_share` (share of synthetic rows nearer a training row than any held-out row; 0.5 when
    the two real sets are the same size and the generator does not copy), `dcr_overfitting_protection`
    (min(2 (1 - that share), 1); 1 is best) and `dcr_baseline_protection` (median synthetic DCR over a
    uniform-random table's, capped at 1; 1 is best). `train` should be as large as `heldout`."""
    from sdmetrics.single_table import DCRBaselineProtection, DCROverfittingProtection

    meta = sdmetrics_metadata(kinds)
    t, s, h = (_for_sdmetrics(f, kinds) for f in (train, synthetic, heldout))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        over = DCROverfittingProtection.compute_breakdown(t, s, h, meta, "t")
        base = DCRBaselineProtection.compute_breakdown(t, s, meta, "t")
    return {
        "closer_to_training_share": float(over["synthetic_data_percentages"]["closer_to_training"]),
        "dcr_overfitting_protection": float(over["score"]),
        "dcr_baseline_protection": float(base["score"]),
        "median_dcr": float(base["median_DCR_to_real_data"]["synthetic_data"]),
    }


class Features:
    """Real and synthetic rows as one float matrix for scikit-learn: numbers as they are (missing: NaN),
    datetimes as seconds, categories as codes of the values seen in `reference` (missing or unseen: NaN),
    flagged for HistGradientBoosting's native categorical handling."""

    def __init__(self, reference: pd.DataFrame, kinds: Kinds, exclude: tuple[str, ...] = ()) -> None:
        self.kinds = {k: v for k, v in kinds.items() if k not in exclude}
        self.codes: dict[str, dict[str, int]] = {}
        for name, kind in self.kinds.items():
            if kind == "categorical":
                values = sorted({str(v) for v in reference[name].dropna()})
                self.codes[name] = {v: i for i, v in enumerate(values)}

    @property
    def categorical(self) -> list[bool]:
        return [name in self.codes and len(self.codes[name]) <= MAX_CATEGORIES for name in self.kinds]

    def __call__(self, frame: pd.DataFrame) -> np.ndarray:
        import pandas as pd

        cols = []
        for name, kind in self.kinds.items():
            col = frame[name]
            if kind == "categorical":
                codes = self.codes[name]
                cols.append(np.array([codes.get(str(v), np.nan) if not pd.isna(v) else np.nan for v in col], float))
            elif kind == "datetime":
                cols.append(pd.to_datetime(col).astype("int64").to_numpy(float) / 1e9)
            else:
                cols.append(pd.to_numeric(col, errors="coerce").to_numpy(dtype=float))
        return np.stack(cols, axis=1) if cols else np.zeros((len(frame), 0))


def detection(real: pd.DataFrame, synthetic: pd.DataFrame, kinds: Kinds, seed: int = 0) -> dict[str, float]:
    """A classifier two-sample test: HistGradientBoosting (fixed settings) tells `min(len)` real rows from as
    many synthetic rows, stratified `FOLDS`-fold cross-validated. `detection_accuracy` (0.5: cannot tell them
    apart; 1: always can) and `detection_auc` (the same scale)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(seed)
    m = min(len(real), len(synthetic))
    r = real.iloc[rng.permutation(len(real))[:m]]
    s = synthetic.iloc[rng.permutation(len(synthetic))[:m]]
    feats = Features(real, kinds)
    x = np.concatenate([feats(r), feats(s)])
    y = np.r_[np.zeros(m), np.ones(m)]
    clf = HistGradientBoostingClassifier(max_iter=100, categorical_features=feats.categorical, random_state=seed)
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    p = cross_val_predict(clf, x, y, cv=folds, method="predict_proba")[:, 1]
    from sklearn.metrics import roc_auc_score

    return {"detection_accuracy": float(np.mean((p > 0.5) == y)), "detection_auc": float(roc_auc_score(y, p))}


def default_target(kinds: Kinds) -> str:
    """The last categorical column, else the last numerical one."""
    cats = [k for k, v in kinds.items() if v == "categorical"]
    return cats[-1] if cats else [k for k, v in kinds.items() if v == "numerical"][-1]


def efficacy(
    fit_on: pd.DataFrame, test: pd.DataFrame, kinds: Kinds, target: str, seed: int = 0
) -> dict[str, float | str]:
    """Machine-learning efficacy: a HistGradientBoosting model predicting `target` from the other columns,
    fitted on `fit_on`, scored on `test` (rows with `target` missing dropped): accuracy and macro F1 for a
    categorical target, R² and MAE for a numerical one."""
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import f1_score, mean_absolute_error, r2_score

    fit_on, test = fit_on[fit_on[target].notna()], test[test[target].notna()]
    feats = Features(pd.concat([fit_on, test]), kinds, exclude=(target,))
    if kinds[target] == "categorical":
        y_fit, y_test = fit_on[target].astype(str).to_numpy(), test[target].astype(str).to_numpy()
        if len(set(y_fit)) < 2:  # one class: the model predicts it
            pred = np.full(len(y_test), y_fit[0] if len(y_fit) else "")
        else:
            clf = HistGradientBoostingClassifier(categorical_features=feats.categorical, random_state=seed)
            pred = clf.fit(feats(fit_on), y_fit).predict(feats(test))
        return {
            "task": "classification",
            "accuracy": float(np.mean(pred == y_test)),
            "macro_f1": float(f1_score(y_test, pred, average="macro", zero_division=0)),
        }
    yf, yt = (pd.to_numeric(f[target]).to_numpy(float) for f in (fit_on, test))
    reg = HistGradientBoostingRegressor(categorical_features=feats.categorical, random_state=seed)
    pred = reg.fit(feats(fit_on), yf).predict(feats(test))
    return {"task": "regression", "r2": float(r2_score(yt, pred)), "mae": float(mean_absolute_error(yt, pred))}


def _one_hot(frame: pd.DataFrame, kinds: Kinds, stats: dict[str, Any]) -> np.ndarray:
    """Numbers standardised (by `stats`), categories one-hot (a missing cell: NaN in its whole block)."""
    blocks = []
    for name, kind in kinds.items():
        if kind == "categorical":
            cats = stats[name]
            col = frame[name]
            block = np.array([[float(str(v) == c) for c in cats] for v in col]) if cats else np.zeros((len(col), 0))
            block[col.isna().to_numpy()] = np.nan
            blocks.append(block.reshape(len(col), len(cats)))
        else:
            mean, std = stats[name]
            blocks.append(((_numbers(frame[name], kind) - mean) / std)[:, None])
    return np.concatenate(blocks, axis=1)


def _numbers(col: pd.Series, kind: str) -> np.ndarray:
    import pandas as pd

    if kind == "datetime":
        stamps = pd.to_datetime(col)
        return np.where(stamps.isna(), np.nan, stamps.astype("int64").to_numpy(float) / 1e9)
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)


BASELINES = ("mean_mode", "knn", "mice")


def baseline_fill(method: str, reference: pd.DataFrame, masked: pd.DataFrame, kinds: Kinds, seed: int = 0) -> Any:
    """`masked` with its missing cells filled by `method`: "mean_mode" (the mean of `reference`'s numbers, the
    mode of its categories: what SDV does), "knn" (sklearn KNNImputer, 5 neighbours) or "mice" (sklearn
    IterativeImputer, 10 rounds of Bayesian ridge), both on standardised numbers and one-hot categories
    fitted on `reference` + `masked`; a category is the arg-max of its filled one-hot block."""
    import pandas as pd

    out = masked.copy()
    if method == "mean_mode":
        for name, kind in kinds.items():
            miss = out[name].isna()
            if not miss.any():
                continue
            ref = reference[name].dropna()
            if kind == "categorical":
                fill: Any = ref.astype(object).mode().iloc[0]
            elif kind == "datetime":
                fill = pd.to_datetime(ref).mean()
            else:
                fill = float(_numbers(ref, kind).mean())
            if kind == "categorical":
                col = out[name].astype(object)
                col[miss] = fill
                out[name] = col
            else:
                out[name] = (out[name] if kind == "datetime" else out[name].astype(float)).where(~miss, fill)
        return out
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer

    both = pd.concat([reference, masked], ignore_index=True)
    stats: dict[str, Any] = {}
    for name, kind in kinds.items():
        if kind == "categorical":
            stats[name] = sorted({str(v) for v in both[name].dropna()})
        else:
            v = _numbers(both[name], kind)
            stats[name] = (float(np.nanmean(v)), float(np.nanstd(v)) or 1.0)
    x_all = _one_hot(both, kinds, stats)
    imputer: Any = (
        KNNImputer(n_neighbors=5)
        if method == "knn"
        else IterativeImputer(max_iter=10, random_state=seed, keep_empty_features=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        filled = imputer.fit(x_all).transform(_one_hot(masked, kinds, stats))
    at = 0
    for name, kind in kinds.items():
        width = len(stats[name]) if kind == "categorical" else 1
        block, miss = filled[:, at : at + width], masked[name].isna().to_numpy()
        at += width
        if not miss.any() or width == 0:
            continue
        if kind == "categorical":
            values = np.array(stats[name], dtype=object)[block.argmax(axis=1)]
            col = out[name].astype(object)
            col[miss] = values[miss]
            out[name] = col
        else:
            mean, std = stats[name]
            numbers = block[:, 0] * std + mean
            if kind == "datetime":
                out[name] = out[name].where(~miss, pd.to_datetime(numbers * 1e9))
            else:
                out[name] = out[name].astype(float).where(~miss, numbers)
    return out


def cell_errors(
    truth: pd.DataFrame, filled: pd.DataFrame, mask: np.ndarray, kinds: Kinds, scale: dict[str, float]
) -> dict[str, float]:
    """Errors on the hidden cells (`mask`, rows x kinds' columns): `mae`, `rmse` (numbers, each column divided
    by its `scale`, the training standard deviation, then pooled over cells: 0 is exact), `accuracy`
    (categories: share of hidden cells filled with the true category)."""
    abs_err, right = [], []
    for j, (name, kind) in enumerate(kinds.items()):
        rows = np.flatnonzero(mask[:, j])
        if not len(rows):
            continue
        if kind == "categorical":
            t, f = truth[name].iloc[rows].astype(str).to_numpy(), filled[name].iloc[rows].astype(str).to_numpy()
            right.extend((t == f).tolist())
        else:
            t, f = _numbers(truth[name].iloc[rows], kind), _numbers(filled[name].iloc[rows], kind)
            abs_err.extend((np.abs(t - f) / scale[name]).tolist())
    e = np.asarray(abs_err, dtype=float)
    return {
        "mae": float(e.mean()) if len(e) else float("nan"),
        "rmse": float(np.sqrt((e**2).mean())) if len(e) else float("nan"),
        "accuracy": float(np.mean(right)) if right else float("nan"),
    }


def crps_and_coverage(
    truth: pd.DataFrame, draws: list[pd.DataFrame], mask: np.ndarray, kinds: Kinds, scale: dict[str, float]
) -> dict[str, float]:
    """Over the hidden number cells, from K draws: `crps` (the empirical CRPS, mean |X - y| - ½ mean |X - X'|,
    in units of the column's `scale`; equals the MAE for a single point; 0 is exact) and `coverage` (share of
    true values within the 2.5-97.5 % quantiles of the draws; nominal 0.95)."""
    scores, inside = [], []
    for j, (name, kind) in enumerate(kinds.items()):
        rows = np.flatnonzero(mask[:, j])
        if kind == "categorical" or not len(rows):
            continue
        y = _numbers(truth[name].iloc[rows], kind) / scale[name]
        x = np.stack([_numbers(d[name].iloc[rows], kind) for d in draws], axis=1) / scale[name]  # (cells, K)
        term1 = np.abs(x - y[:, None]).mean(axis=1)
        term2 = np.abs(x[:, :, None] - x[:, None, :]).mean(axis=(1, 2))
        scores.extend((term1 - 0.5 * term2).tolist())
        low, high = np.quantile(x, 0.025, axis=1), np.quantile(x, 0.975, axis=1)
        inside.extend(((y >= low - 1e-9) & (y <= high + 1e-9)).tolist())
    return {
        "crps": float(np.mean(scores)) if scores else float("nan"),
        "coverage": float(np.mean(inside)) if inside else float("nan"),
    }
