"""What the judge's figures mean: reference "generators" scored exactly as the demo scores a model.

    python bench/judge_scale.py                           # the reference points on the digits
    python bench/judge_scale.py --model runs/demo/model   # and a model, over the same number of sets

The judge (src/sdpipe/evaluate/judge.py) is fitted on the digits' training part and compares samples with the
held-out quarter, which no model trains on. Each reference draws --sets sets of --n images (labels in turn, as
the evaluation asks for them) and prints the mean and 95 % interval of each figure:

- copies: training images themselves (with replacement): the Frechet ratio's 1.0 and the two-sample test's
  0.5 by construction, and every one a near-copy;
- noisy copies: the same plus Gaussian pixel noise of sd 0.5..2 (of 0..16), rounded to the PNG's 255 levels:
  memorization the near-copy rule must catch, and how far noise moves the other figures;
- a per-class Gaussian fitted to the training part: a generator that knows only each class's mean and
  covariance;
- with --model: the model at its own sampling settings (or --steps), seeds as `sdpipe evaluate` draws them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from sdpipe.config import load_config
from sdpipe.data import Dataset
from sdpipe.data.imageset import split_arrays
from sdpipe.evaluate.intervals import fmt, summarize
from sdpipe.evaluate.judge import Judge, draw_training_copies
from sdpipe.evaluate.run import fit_judge, score_sets

# one reference set: (rng, n) -> (images in 0..16, the labels they were drawn for)
Draw = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def as_png(x: np.ndarray) -> np.ndarray:
    """0..16 intensities as a PNG holds them: clipped, rounded to 255 levels."""
    return np.round(np.clip(x, 0, 16) * 255 / 16) * 16 / 255


def copies(train: Dataset, noise: float) -> Draw:
    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        pick = draw_training_copies(len(train.images), train.labels, n, rng)
        x = train.images[pick]
        return as_png(x + noise * rng.standard_normal(x.shape) if noise else x), train.labels[pick]

    return draw


def class_gaussian(train: Dataset) -> Draw:
    flat = train.images.reshape(len(train.images), -1)
    fits = [(flat[train.labels == c].mean(0), np.cov(flat[train.labels == c], rowvar=False)) for c in range(10)]

    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 10
        x = np.stack([rng.multivariate_normal(*fits[c]) for c in labels]).reshape(n, *train.images.shape[1:])
        return as_png(x), labels

    return draw


def line(name: str, row: dict) -> str:
    iv = row["intervals"]
    return (
        f"  {name:<34} FD ratio {fmt(iv['fd_ratio'])}  two-sample {fmt(iv['two_sample_accuracy'], 3)}  "
        f"near-copies {fmt(iv['near_copy_share'], 1, True)}  accuracy {fmt(iv['label_accuracy'], 1, True)}"
    )


def reference(judge: Judge, draw: Draw, n: int, sets: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return summarize([judge.score(*draw(rng, n)) for _ in range(sets)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="samples per set (the demo judges 1000)")
    parser.add_argument("--sets", type=int, default=4, help="sets per reference and for --model")
    parser.add_argument("--model", help="a model directory to score as well")
    parser.add_argument("--steps", type=int, help="sampler steps for --model (default: the model's own)")
    args = parser.parse_args()
    cfg = load_config(None, [f"evaluate.n_samples={args.n}", f"evaluate.sample_sets={args.sets}"])
    train, heldout = split_arrays(cfg.data, "train"), split_arrays(cfg.data, "test")
    judge = fit_judge(train, heldout, cfg.evaluate)
    print(
        f"digits: judge fitted on {len(train.images)} training images, held-out part {len(heldout.images)}; "
        f"{args.sets} sets of {args.n}; mean (95 % interval)"
    )
    print(f"  two-sample test of real training images vs held-out: {judge.real_two_sample():.3f}")
    seed = cfg.evaluate.seed
    for noise in (0.0, 0.5, 1.0, 1.5, 2.0):
        name = "training images themselves" if noise == 0 else f"copies + pixel noise sd {noise}"
        print(line(name, reference(judge, copies(train, noise), args.n, args.sets, seed)), flush=True)
    print(line("per-class Gaussian", reference(judge, class_gaussian(train), args.n, args.sets, seed)))
    if args.model:
        from sdpipe.models import load_model
        from sdpipe.sampling.generate import model_sample_spec

        model = load_model(args.model)
        spec = model_sample_spec(model.meta.config, model.scheduler_config, args.steps, None, None)
        row = score_sets(model, judge, spec, cfg.evaluate, args.sets, show_progress=False)
        print(line(f"{args.model} ({spec.sampler} x{spec.steps})", row))


if __name__ == "__main__":
    main()
