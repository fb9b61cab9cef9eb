"""Masked vs one-hot diffusion for a table's categories (issue 18, item 3): which one `TableModelConfig`
uses by default. Not a test; prints its figures.

Data: palmerpenguins 0.1.6 (`pip install palmerpenguins==0.1.6`; 344 rows: species, island, sex
categorical, four measurements and year, with missing cells), split 75 / 25 by a fixed permutation. For each
option and 3 training seeds: train on the 258 training rows, generate 1000 rows, and compare with the 86
held-out rows:

* marginal fidelity per column: total-variation distance (categories) and the Kolmogorov-Smirnov
  statistic (numbers), missing cells dropped as SDMetrics does;
* pairwise association error: |real - generated| of Pearson's r (two numbers) or Cramér's V (otherwise, a
  number cut at the real data's quartiles), averaged over all column pairs;
* training seconds.

Each figure: mean and 95 % t-interval over the seeds. Run single-threaded and niced:

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/table_categorical.py [--steps 3000]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from sdpipe.config import load_config
from sdpipe.tabular.generate import generate_rows
from sdpipe.tabular.model_config import TableModelConfig
from sdpipe.tabular.preprocess import fit_preprocessor
from sdpipe.tabular.schema import Column, TypedTable
from sdpipe.tabular.train import train_table_model

TYPES = {
    "species": "categorical",
    "island": "categorical",
    "bill_length_mm": "numeric",
    "bill_depth_mm": "numeric",
    "flipper_length_mm": "numeric",
    "body_mass_g": "numeric",
    "sex": "categorical",
    "year": "integer",
}
CATEGORIES = [n for n, t in TYPES.items() if t == "categorical"]


def penguins() -> pd.DataFrame:
    import palmerpenguins

    frame = palmerpenguins.load_penguins()
    for name in CATEGORIES:
        frame[name] = frame[name].astype(object).where(frame[name].notna(), None)
    return frame[list(TYPES)]


def typed(frame: pd.DataFrame) -> TypedTable:
    columns = [Column(name, TYPES[name], "bench", "") for name in frame.columns]
    values = {name: frame[name].reset_index(drop=True) for name in frame.columns}
    return TypedTable(columns, values, {k: v.isna().to_numpy() for k, v in values.items()}, len(frame))


def marginal(real: pd.Series, fake: pd.Series, name: str) -> float:
    r, f = real.dropna(), fake.dropna()
    if name in CATEGORIES:
        p, q = r.value_counts(normalize=True), f.value_counts(normalize=True)
        return 0.5 * float(p.sub(q, fill_value=0).abs().sum())
    return float(stats.ks_2samp(r.astype(float), f.astype(float)).statistic)


def _discrete(values: pd.Series, name: str, edges: dict[str, np.ndarray]) -> pd.Series:
    if name in CATEGORIES:
        return values.astype(str)
    return pd.Series(np.digitize(values.astype(float), edges[name]), index=values.index).astype(str)


def cramers_v(a: pd.Series, b: pd.Series) -> float:
    table = pd.crosstab(a, b)
    if min(table.shape) < 2:
        return 0.0
    chi2 = stats.chi2_contingency(table, correction=False)[0]
    return float(np.sqrt(chi2 / (table.to_numpy().sum() * (min(table.shape) - 1))))


def association(frame: pd.DataFrame, x: str, y: str, edges: dict[str, np.ndarray]) -> float:
    both = frame[[x, y]].dropna()
    if x not in CATEGORIES and y not in CATEGORIES:
        return float(np.corrcoef(both[x].astype(float), both[y].astype(float))[0, 1])
    return cramers_v(_discrete(both[x], x, edges), _discrete(both[y], y, edges))


def scores(real: pd.DataFrame, fake: pd.DataFrame) -> dict[str, float]:
    edges = {n: np.nanquantile(real[n].astype(float), [0.25, 0.5, 0.75]) for n in TYPES if n not in CATEGORIES}
    out = {f"marginal {n}": marginal(real[n], fake[n], n) for n in TYPES}
    out["marginal categories (TV)"] = float(np.mean([out[f"marginal {n}"] for n in CATEGORIES]))
    out["marginal numbers (KS)"] = float(np.mean([out[f"marginal {n}"] for n in TYPES if n not in CATEGORIES]))
    pairs = list(itertools.combinations(TYPES, 2))
    errors = [abs(association(real, x, y, edges) - association(fake, x, y, edges)) for x, y in pairs]
    out["pair association error"] = float(np.mean(errors))
    cat_pairs = [e for (x, y), e in zip(pairs, errors, strict=True) if x in CATEGORIES or y in CATEGORIES]
    out["pair error, pairs with a category"] = float(np.mean(cat_pairs))
    return out


def interval(values: list[float]) -> str:
    v = np.asarray(values)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return f"{v.mean():.4f} ± {half:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    frame = penguins()
    order = np.random.default_rng(0).permutation(len(frame))
    train_rows, held_out = order[: int(0.75 * len(frame))], order[int(0.75 * len(frame)) :]
    table = typed(frame)
    pre = fit_preprocessor(table, rows=train_rows)
    encoded = pre.encode(frame.iloc[train_rows].reset_index(drop=True))
    real = frame.iloc[held_out].reset_index(drop=True)
    print(f"palmerpenguins: {len(train_rows)} training rows, {len(real)} held-out rows, {args.rows} generated")
    print(f"steps {args.steps}, seeds {args.seeds}; encoded: numbers {pre.numeric_names}, "
          f"categories {pre.categorical_names} {pre.category_sizes}")  # fmt: skip
    results: dict[str, dict[str, list[float]]] = {}
    for option in ("masked", "onehot"):
        for seed in range(args.seeds):
            sets = [f"train.steps={args.steps}", "train.batch_size=128", f"train.seed={seed}",
                    "train.warmup_steps=100", "train.learning_rate=2e-3", "train.uncertainty_weighting=false",
                    f"train.checkpoint_every={args.steps}", "train.keep_checkpoints=1", "train.threads=1"]  # fmt: skip
            cfg = load_config(None, sets).train
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                out = train_table_model(encoded, None, pre, TableModelConfig(categorical=option), cfg, Path(tmp) / "r")
                seconds = time.perf_counter() - start
            fake = generate_rows(out.model, args.rows, seed=1000 + seed)
            got = scores(real, fake) | {"training seconds": seconds}
            for key, value in got.items():
                results.setdefault(option, {}).setdefault(key, []).append(value)
            print(f"  {option} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items() if "marginal " not in k
                  or "(" in k))  # fmt: skip
    keys = list(results["masked"])
    print(f"\n{'figure (mean ± 95 % interval over seeds)':44s} {'masked':>20s} {'onehot':>20s}")
    for key in keys:
        print(f"{key:44s} {interval(results['masked'][key]):>20s} {interval(results['onehot'][key]):>20s}")


if __name__ == "__main__":
    main()
