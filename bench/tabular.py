"""sdpipe's table model against SDV's GaussianCopula, CTGAN and TVAE (issue 18, item 7), every model judged by
the same `sdpipe.tabular.evaluate` on the same split. Not a test; prints a table and writes JSON.

Data: palmerpenguins 0.1.6 (344 rows; species, island, sex categorical; four measurements with missing cells;
year), split 75 / 25 by `numpy.random.default_rng(0).permutation` as bench/table_categorical.py does: 258
training rows, 86 held-out rows. For each model and `--seeds` training seeds: fit on the training rows, draw
`--sets` sets of 258 rows, and score each set against the held-out rows (`evaluate_samples`: SDMetrics 0.32
quality report, classifier two-sample test, efficacy on `sex`, DCR privacy against an 86-row training
subsample). Every figure: mean and 95 % t-interval over all seeds x sets. Imputation: 20 % of the held-out
cells hidden (seeds 0..sets-1), filled by sdpipe's `impute` (10 draws, conditioned on the observed cells) and
by mean/mode (SDV's fill), k-NN and MICE fitted on the training rows (`evaluate_imputation`).

Settings: sdpipe `TableModelConfig()` defaults, 3000 steps, batch 128, lr 2e-3; CTGAN and TVAE
`--epochs` (default 300, batch 500: SDV's default batch, so one step per epoch on 258 rows), other SDV
settings default. SDV fitting is not seedable (SDV #2398): each seed sets numpy's and torch's global seeds
before the fit.

SDV is BUSL-1.1: a bench-only extra, never a dependency. sdv 2.0 and sdmetrics 0.32 declare pandas<3; they
run on the venv's pandas 3.1 when installed without dependencies, e.g. beside the venv:

    .venv/bin/pip install --no-deps sdmetrics==0.32.0 copulas==0.14.1 plotly narwhals
    .venv/bin/pip install --target /tmp/sdv --no-deps sdv==2.0.0 ctgan==0.12.1 deepecho==0.8.1 rdt==2.0.0 \\
        Faker graphviz boto3 botocore jmespath s3transfer platformdirs python-dateutil pytz six
    PYTHONPATH=/tmp/sdv OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/tabular.py --out bench-sdv.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from table_categorical import TYPES, penguins, typed  # the same table, read the same way (bench/ is on sys.path)

from sdpipe.config import load_config
from sdpipe.evaluate.intervals import interval
from sdpipe.tabular.evaluate import evaluate_imputation, evaluate_samples, model_imputer
from sdpipe.tabular.generate import generate_rows
from sdpipe.tabular.model_config import TableModelConfig
from sdpipe.tabular.preprocess import fit_preprocessor
from sdpipe.tabular.train import train_table_model

KINDS = {n: "categorical" if t == "categorical" else "numerical" for n, t in TYPES.items()}
SHOWN = [
    "quality_score", "column_shapes", "column_pair_trends", "detection_accuracy", "detection_auc",
    "efficacy_synthetic", "efficacy_real", "closer_to_training_share", "dcr_baseline_protection",
]  # fmt: skip


Sampler = Callable[[int, int], pd.DataFrame]  # (n, seed) -> rows


def fit_sdpipe(frame: pd.DataFrame, train: pd.DataFrame, seed: int, steps: int, tmp: Path) -> tuple[Sampler, Any]:
    rows = np.flatnonzero(frame.index.isin(train.index))
    pre = fit_preprocessor(typed(frame), rows=rows)
    sets = [f"train.steps={steps}", "train.batch_size=128", f"train.seed={seed}", "train.warmup_steps=100",
            "train.learning_rate=2e-3", "train.uncertainty_weighting=false", f"train.checkpoint_every={steps}",
            "train.keep_checkpoints=1", "train.threads=1"]  # fmt: skip
    out = train_table_model(pre.encode(train.reset_index(drop=True)), None, pre, TableModelConfig(),
                            load_config(None, sets).train, tmp / f"sdpipe-{seed}")  # fmt: skip
    return (lambda n, s: generate_rows(out.model, n, seed=s)), out.model


def fit_sdv(name: str, train: pd.DataFrame, seed: int, epochs: int) -> Sampler:
    from sdv.metadata import Metadata
    from sdv.single_table import CTGANSynthesizer, GaussianCopulaSynthesizer, TVAESynthesizer

    np.random.seed(seed)
    torch.manual_seed(seed)
    data = train.reset_index(drop=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = Metadata.detect_from_dataframes({"t": data})
        for col, kind in TYPES.items():  # the same column types as sdpipe's
            meta.update_column(col, table_name="t", sdtype="categorical" if kind == "categorical" else "numerical")
        cls: Any = {"GaussianCopula": GaussianCopulaSynthesizer, "CTGAN": CTGANSynthesizer, "TVAE": TVAESynthesizer}
        synth = cls[name](meta, **({"epochs": epochs} if name in ("CTGAN", "TVAE") else {}))
        synth.fit({"t": data})

    def sample(n: int, s: int) -> pd.DataFrame:
        np.random.seed(s)
        torch.manual_seed(s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = synth.sample(num_rows=n)
        return (out["t"] if isinstance(out, dict) else out)[list(TYPES)]

    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--sets", type=int, default=4)
    parser.add_argument("--models", default="sdpipe,GaussianCopula,CTGAN,TVAE")
    parser.add_argument("--out", type=Path, default=Path("bench-tables-vs-sdv.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    frame = penguins()
    order = np.random.default_rng(0).permutation(len(frame))
    train, heldout = frame.iloc[order[:258]], frame.iloc[order[258:]].reset_index(drop=True)
    n = len(train)
    print(f"palmerpenguins: {len(train)} training rows, {len(heldout)} held-out; {args.seeds} seeds x {args.sets} "
          f"sets of {n} rows; sdpipe {args.steps} steps; CTGAN/TVAE {args.epochs} epochs")  # fmt: skip
    results: dict[str, Any] = {"settings": vars(args) | {"out": str(args.out), "rows": n}, "models": {}}
    imputer_model = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            values: dict[str, list[float]] = {}
            fit_s, sample_s = [], []
            extra: dict[str, Any] = {}
            for seed in range(args.seeds):
                start = time.perf_counter()
                if name == "sdpipe":
                    sampler, model = fit_sdpipe(frame, train, seed, args.steps, Path(tmp))
                    imputer_model = imputer_model or model
                else:
                    sampler = fit_sdv(name, train, seed, args.epochs)
                fit_s.append(time.perf_counter() - start)
                fakes = []
                for k in range(args.sets):
                    start = time.perf_counter()
                    fakes.append(sampler(n, 1000 * seed + k * n))
                    sample_s.append(time.perf_counter() - start)
                got = evaluate_samples(fakes, heldout, train.reset_index(drop=True), KINDS, "sex", seed)
                extra = {k: got[k] for k in ("sdmetrics", "thresholds", "target", "detection_classifier")}
                for key, iv in got["figures"].items():
                    values.setdefault(key, []).extend(iv["values"])
                print(f"  {name} seed {seed}: fit {fit_s[-1]:.0f} s, " + ", ".join(
                    f"{k} {np.mean(values[k][-args.sets:]):.3f}" for k in SHOWN if k in values))  # fmt: skip
            figures = {k: interval(v) for k, v in values.items()}
            figures["fit_seconds"], figures["sample_seconds"] = interval(fit_s), interval(sample_s)
            results["models"][name] = {"figures": figures} | extra
    if imputer_model is not None:
        imp = evaluate_imputation(imputer_model, heldout, train.reset_index(drop=True), 0.2, 10, args.sets, 0,
                                  imputer=model_imputer(imputer_model, 10), kinds=KINDS)  # fmt: skip
        results["imputation"] = {k: imp[k] for k in ("methods", "hidden_cells", "settings")}
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    models = list(results["models"])
    print(f"\n{'figure (mean, 95 % interval over seeds x sets)':34s}" + "".join(f"{m:>24s}" for m in models))
    for key in [*SHOWN, "fit_seconds", "sample_seconds"]:
        cells = [results["models"][m]["figures"].get(key) for m in models]
        print(f"{key:34s}" + "".join(f"{_fmt(c):>24s}" for c in cells))
    if "imputation" in results:
        methods = results["imputation"]["methods"]
        print(f"\n{'imputation (20 % of held-out cells)':34s}" + "".join(f"{m:>24s}" for m in methods))
        for key in ("mae", "rmse", "accuracy", "crps", "coverage"):
            print(f"{key:34s}" + "".join(f"{_fmt(methods[m].get(key)):>24s}" for m in methods))
    print(f"\nwrote {args.out}")


def _fmt(iv: dict[str, Any] | None) -> str:
    if iv is None:
        return "-"
    return f"{iv['mean']:.3f} ({iv['low']:.3f}-{iv['high']:.3f})"


if __name__ == "__main__":
    main()
