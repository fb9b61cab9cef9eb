"""Evaluating a table model against held-out real rows (issue 18, item 6); see docs/table-models.md, "Evaluation".

    result = evaluate_table_model("runs/t1/model", heldout, train, "runs/t1/eval", sets=4, seed=0)
    result["figures"]["quality_score"]      # {"mean", "low", "high", "values", "scale"}

Synthetic figures (`evaluate_samples`, for any generator's sample sets, so SDV's models get the same judge):
SDMetrics' quality report, a classifier two-sample test, machine-learning efficacy beside the real-data
model, and DCR privacy. Imputation figures (`evaluate_imputation`): cells of the held-out rows hidden at
random with a seed, filled, and compared with the truth, for the model and the mean/mode, k-NN and MICE
baselines. Every figure is a mean with a 95 % Student-t interval over `sets` independent sets
(`sdpipe.evaluate.intervals.interval`): synthetic set k is rows of seeds seed + k·n … seed + (k+1)·n - 1;
imputation set k hides cells with `numpy.random.default_rng(seed + k)`. The sdmetrics version and the
thresholds its quality report applied are recorded with every score; without sdmetrics those figures are
"skipped" and the rest are computed.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdpipe.evaluate.intervals import interval
from sdpipe.tabular import evaluate_metrics as em
from sdpipe.tabular.evaluate_metrics import BASELINES, SDMETRICS_MISSING, Kinds

if TYPE_CHECKING:
    import pandas as pd

    from sdpipe.tabular.train import TableModel

METRICS_FILE, REPORT_FILE = "metrics.json", "report.html"

# figure -> its scale, as written next to it in metrics.json and the report
SCALES = {
    "quality_score": "0-1, 1 = same shapes and pair trends as the held-out rows (SDMetrics QualityReport)",
    "column_shapes": "0-1, mean of KSComplement (numbers) / TVComplement (categories); 1 best",
    "column_pair_trends": "0-1, mean of CorrelationSimilarity / ContingencySimilarity over pairs past the "
    "real-data thresholds; 1 best",
    "detection_accuracy": "0.5-1, cross-validated accuracy telling synthetic from held-out rows; 0.5 best",
    "detection_auc": "0.5-1, the same classifier's ROC AUC; 0.5 best",
    "efficacy_synthetic": "target model fitted on synthetic rows, scored on held-out rows (accuracy or R²); "
    "compare with efficacy_real",
    "efficacy_real": "the same model fitted on the training rows (the ceiling)",
    "efficacy_ratio": "efficacy_synthetic / efficacy_real; 1 = as useful as the real rows",
    "closer_to_training_share": "0-1, share of synthetic rows nearer a training row than any held-out row "
    "(equal-sized sets); 0.5 = no copying, 1 = copies",
    "dcr_overfitting_protection": "0-1, min(2 (1 - closer_to_training_share), 1) (SDMetrics); 1 best",
    "dcr_baseline_protection": "0-1, median DCR of synthetic rows / of uniform random rows, capped (SDMetrics); "
    "1 = as far from real rows as random ones",
    "sample_seconds": "seconds to generate one set",
    "mae": "mean |filled - true| over hidden number cells, in training standard deviations; 0 best",
    "rmse": "root mean square of the same; 0 best",
    "accuracy": "share of hidden category cells filled with the true category; 1 best",
    "crps": "continuous ranked probability score of the draws, in training standard deviations (a point "
    "fill: its MAE); 0 best",
    "coverage": "share of hidden number cells inside the 2.5-97.5 % draws; 0.95 nominal",
}


def model_kinds(model: TableModel) -> Kinds:
    """The modelled columns of `model` as evaluation kinds (ids, text and empty columns are left out)."""
    out: Kinds = {}
    for spec in model.preprocessor.columns:
        if spec.role == "category":
            out[spec.name] = "categorical"
        elif spec.role == "number":
            out[spec.name] = "datetime" if spec.type == "datetime" else "numerical"
    return out


def _summaries(rows: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    keys = [k for k in rows[0] if all(isinstance(r.get(k), float) and np.isfinite(r[k]) for r in rows)]
    return {k: interval([r[k] for r in rows]) | {"scale": SCALES.get(k, "")} for k in keys}


def _efficacy_value(result: dict[str, Any]) -> float:
    return float(result["accuracy"] if result["task"] == "classification" else result["r2"])


def evaluate_samples(
    sample_sets: Sequence[pd.DataFrame],
    real_heldout: pd.DataFrame,
    train: pd.DataFrame | None = None,
    kinds: Kinds | None = None,
    target: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The synthetic figures (SCALES) of each set in `sample_sets` against `real_heldout` (and `train`, for
    efficacy and privacy), as {"figures": {name: interval + scale}, "skipped": {name: why}, "sdmetrics",
    "thresholds", "target", "efficacy_task", "per_set", "per_column"}."""
    kinds = dict(kinds or em.infer_kinds(real_heldout))
    target = target or em.default_target(kinds)
    version = em.sdmetrics_version()
    skipped: dict[str, str] = {}
    rows: list[dict[str, float]] = []
    per_column: list[dict[str, float]] = []
    thresholds: dict[str, float] = {}
    real_eff = em.efficacy(train, real_heldout, kinds, target, seed) if train is not None else None
    for k, fake in enumerate(sample_sets):
        row: dict[str, float] = {}
        if version is not None:
            q = em.quality(real_heldout, fake, kinds)
            thresholds = q.pop("thresholds")
            per_column.append(q.pop("per_column"))
            row |= q
        row |= em.detection(real_heldout, fake, kinds, seed + k)
        if train is not None and real_eff is not None:
            eff = em.efficacy(fake, real_heldout, kinds, target, seed)
            row["efficacy_synthetic"] = _efficacy_value(eff)
            row["efficacy_real"] = _efficacy_value(real_eff)
            row["efficacy_ratio"] = row["efficacy_synthetic"] / row["efficacy_real"] if row["efficacy_real"] else np.nan
            row |= {f"efficacy_synthetic_{m}": float(v) for m, v in eff.items() if m != "task"}
            if version is not None:  # equal-sized real sets, so 0.5 is the no-copying share
                rng = np.random.default_rng(seed + k)
                m = min(len(train), len(real_heldout))
                t = train.iloc[rng.permutation(len(train))[:m]].reset_index(drop=True)
                h = real_heldout.iloc[rng.permutation(len(real_heldout))[:m]].reset_index(drop=True)
                row |= em.privacy(t, fake, h, kinds)
        rows.append(row)
    if version is None:
        skipped |= dict.fromkeys(("quality_score", "column_shapes", "column_pair_trends"), SDMETRICS_MISSING)
        if train is not None:
            skipped |= dict.fromkeys(("closer_to_training_share", "dcr_overfitting_protection"), SDMETRICS_MISSING)
    if train is None:
        skipped |= dict.fromkeys(("efficacy_synthetic", "closer_to_training_share"), "skipped: needs the training rows")
    columns = {c: interval([p[c] for p in per_column]) for c in per_column[0]} if per_column else {}
    return {
        "figures": _summaries(rows),
        "skipped": skipped,
        "sdmetrics": version,
        "thresholds": thresholds,
        "target": target,
        "efficacy_task": real_eff["task"] if real_eff else None,
        "efficacy_real_detail": real_eff,
        "detection_classifier": f"HistGradientBoostingClassifier(max_iter=100), {em.FOLDS}-fold stratified CV",
        "per_set": rows,
        "column_shapes_per_column": columns,
        "sets": len(sample_sets),
        "kinds": kinds,
    }


Imputer = Callable[["pd.DataFrame", int], "tuple[pd.DataFrame, list[pd.DataFrame]]"]


def model_imputer(model: TableModel, draws: int) -> Imputer:
    """sdpipe's `impute` as an `Imputer`: (masked frame, seed) -> (filled frame, the K draws)."""
    from sdpipe.tabular.generate import impute

    def run(masked: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
        out = impute(model, masked, draws=draws, seed=seed)
        return out.frame, out.draws

    return run


def hide_cells(frame: pd.DataFrame, kinds: Kinds, share: float, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """`frame` with a random `share` of its observed cells (kinds' columns) set missing, and that mask
    (rows x kinds' columns), from `numpy.random.default_rng(seed)`."""
    names = list(kinds)
    observed = frame[names].notna().to_numpy()
    mask = (np.random.default_rng(seed).random(observed.shape) < share) & observed
    masked = frame.copy()
    for j, name in enumerate(names):
        if mask[:, j].any():
            col = masked[name]
            masked[name] = (col.astype(object) if kinds[name] == "categorical" else col).where(~mask[:, j])
    return masked, mask


def evaluate_imputation(
    model: TableModel | str | Path | None,
    heldout: pd.DataFrame,
    train: pd.DataFrame | None = None,
    mask_share: float = 0.2,
    draws: int = 10,
    sets: int = 4,
    seed: int = 0,
    baselines: Sequence[str] = BASELINES,
    imputer: Imputer | None = None,
    kinds: Kinds | None = None,
) -> dict[str, Any]:
    """Hide `mask_share` of the observed cells of `heldout` (set k: seed + k), fill them with the model's
    `impute` (`draws` draws; or `imputer`) and with each baseline (fitted on `train`, else on the
    observed held-out cells), and score the fills against the truth: {"methods": {name: {figure: interval}},
    "hidden_cells", "settings"}. Numbers' errors are in training standard deviations."""
    if isinstance(model, (str, Path)):
        from sdpipe.tabular.train import load_table_model

        model = load_table_model(model)
    if imputer is None:
        if model is None:
            raise ValueError("evaluate_imputation needs a model or an imputer")
        imputer = model_imputer(model, draws)
    if kinds is None:
        kinds = model_kinds(model) if model is not None else em.infer_kinds(heldout)
    reference = train if train is not None else heldout
    scale = {}
    for name, kind in kinds.items():
        if kind != "categorical":
            std = float(np.nanstd(em._numbers(reference[name], kind)))
            scale[name] = std if std > 0 else 1.0
    per: dict[str, list[dict[str, float]]] = {}
    hidden = []
    for k in range(sets):
        masked, mask = hide_cells(heldout, kinds, mask_share, seed + k)
        hidden.append(int(mask.sum()))
        filled, draw_frames = imputer(masked, seed + k * len(heldout) * max(draws, 1))
        row = em.cell_errors(heldout, filled, mask, kinds, scale) | em.crps_and_coverage(
            heldout, draw_frames, mask, kinds, scale
        )
        per.setdefault("sdpipe", []).append(row)
        fit_ref = reference if train is not None else masked
        for name in baselines:
            fill = em.baseline_fill(name, fit_ref, masked, kinds, seed + k)
            errs = em.cell_errors(heldout, fill, mask, kinds, scale)
            per.setdefault(name, []).append(errs | {"crps": errs["mae"]})
    return {
        "methods": {name: _summaries(rows) for name, rows in per.items()},
        "hidden_cells": hidden,
        "settings": {
            "mask_share": mask_share,
            "draws": draws,
            "sets": sets,
            "seed": seed,
            "baselines_fitted_on": "training rows" if train is not None else "observed held-out cells",
            "scale": "numbers' errors divided by each column's training standard deviation",
        },  # fmt: skip
        "per_set": per,
    }


def evaluate_table_model(
    model: TableModel | str | Path,
    real_heldout: pd.DataFrame,
    train: pd.DataFrame | None = None,
    out: str | Path | None = None,
    sets: int = 4,
    n: int | None = None,
    seed: int = 0,
    target: str | None = None,
    imputation: bool = True,
    mask_share: float = 0.2,
    draws: int = 10,
) -> dict[str, Any]:
    """Generate `sets` sets of `n` rows (default: as many as `train`, else as `real_heldout`) and score them
    (`evaluate_samples`); with `imputation`, also `evaluate_imputation`. With `out`, writes OUT/metrics.json
    (the returned dict) and OUT/report.html. `model` is a `TableModel` or a RUN/model folder."""
    from sdpipe.tabular.generate import generate_rows
    from sdpipe.tabular.train import load_table_model

    loaded = load_table_model(model) if isinstance(model, (str, Path)) else model
    kinds = model_kinds(loaded)
    n = n or (len(train) if train is not None else len(real_heldout))
    fakes, seconds = [], []
    for k in range(sets):
        start = time.perf_counter()
        fakes.append(generate_rows(loaded, n, seed=seed + k * n))
        seconds.append(time.perf_counter() - start)
    result = evaluate_samples(fakes, real_heldout, train, kinds, target, seed)
    result["figures"]["sample_seconds"] = interval(seconds) | {"scale": SCALES["sample_seconds"]}
    result["settings"] = {"sets": sets, "n": n, "seed": seed, "heldout_rows": len(real_heldout),
                          "train_rows": None if train is None else len(train)}  # fmt: skip
    if isinstance(model, (str, Path)):
        result["model"] = str(model)
    if imputation:
        result["imputation"] = evaluate_imputation(
            loaded, real_heldout, train, mask_share, draws, sets, seed, kinds=kinds
        )
    if out is not None:
        write_results(result, out)
    return result


def _cell(iv: dict[str, Any]) -> str:
    return f"{iv['mean']:.3f} ({iv['low']:.3f} to {iv['high']:.3f})"


def write_results(result: dict[str, Any], out: str | Path) -> Path:
    """OUT/metrics.json (`result`) and OUT/report.html (a table of every figure with its scale)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(result, indent=1, default=str) + "\n")
    e = html.escape
    lines = [
        "<!doctype html><meta charset='utf-8'><title>sdpipe table evaluation</title>",
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}</style>",
        "<h1>Table model evaluation</h1>",
        f"<p>{result.get('sets')} sets; sdmetrics {e(str(result.get('sdmetrics')))}; thresholds "
        f"{e(json.dumps(result.get('thresholds')))}; target {e(str(result.get('target')))}.</p>",
        "<h2>Synthetic rows</h2><table><tr><th>figure</th><th>mean (95 % interval)</th><th>scale</th></tr>",
    ]
    for name, iv in result["figures"].items():
        lines.append(f"<tr><td>{e(name)}</td><td>{_cell(iv)}</td><td>{e(iv.get('scale', ''))}</td></tr>")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"<tr><td>{e(name)}</td><td>{e(why)}</td><td></td></tr>")
    lines.append("</table>")
    if "imputation" in result:
        methods = result["imputation"]["methods"]
        figs = ["mae", "rmse", "accuracy", "crps", "coverage"]
        lines.append("<h2>Imputation of hidden held-out cells</h2><table><tr><th>method</th>")
        lines += [f"<th>{f}</th>" for f in figs] + ["</tr>"]
        for name, got in methods.items():
            cells = "".join(f"<td>{_cell(got[f]) if f in got else '-'}</td>" for f in figs)
            lines.append(f"<tr><td>{e(name)}</td>{cells}</tr>")
        lines.append("</table><ul>" + "".join(f"<li>{f}: {e(SCALES[f])}</li>" for f in figs) + "</ul>")
    (out / REPORT_FILE).write_text("\n".join(lines) + "\n")
    return out
