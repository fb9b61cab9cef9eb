"""What the judge's FD ratio means: reference "generators" scored exactly as the demo scores a model.

    python bench/judge_scale.py                           # the reference points on the digits
    python bench/judge_scale.py --model runs/demo/model   # and a model over several sets of samples

The FD ratio (src/sdpipe/evaluate/judge.py) divides the Frechet distance of n samples to the whole training
set by that of n training images drawn *without replacement*. Those subsets share most of their images with
the set they are compared to, so the baseline is low. This prints, for n = --n:

- copies: n random training images themselves, drawn with replacement (labels in turn, as the evaluation asks
  for them, and at random): what perfect memorization scores, and how far one set swings;
- noisy copies: the same plus Gaussian pixel noise, with their near-copy share: memorization that the
  near-copy rule (< 2 %) lets through;
- new data: held-out real digits (the judge fitted on two thirds, scoring the rest), and fresh draws from a
  Gaussian fitted to the real features against a Gaussian-drawn reference of the real set's size, i.e.
  what a model that generalizes perfectly scores with no memorization at all;
- with --model: the model's FD ratio, label accuracy and near-copy share over --sets sets of n samples at
  its own sampling settings or --steps (sample seeds 1e6.., 2e6.., ...).
"""

from __future__ import annotations

import argparse

import numpy as np

from sdpipe.config import load_config
from sdpipe.data import load_dataset
from sdpipe.evaluate.judge import Judge, draw_training_copies, frechet_distance
from sdpipe.evaluate.run import fit_judge, sample_and_score


def noisy_copies(judge: Judge, images: np.ndarray, labels: np.ndarray, n: int, noise: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    pick = draw_training_copies(len(images), labels, n, rng)
    x = images.reshape(len(images), -1)[pick] + noise * rng.standard_normal((n, images[0].size))
    return judge.score(np.clip(x, images.min(), images.max()), labels[pick])  # each copy's own label


def gaussian_new_data_ratio(features: np.ndarray, n: int, seed: int, repeats: int = 10) -> float:
    """FD ratio of n fresh Gaussian draws against a reference of len(features) draws from the same Gaussian,
    over that of n-subsets of the reference: the judge's geometry with a generator that generalizes perfectly."""
    rng = np.random.default_rng(seed)
    mu, cov = features.mean(0), np.cov(features, rowvar=False)
    ratios = []
    for _ in range(repeats):
        ref = rng.multivariate_normal(mu, cov, len(features))
        base = np.mean([frechet_distance(ref[rng.choice(len(ref), n, False)], ref) for _ in range(10)])
        ratios.append(frechet_distance(rng.multivariate_normal(mu, cov, n), ref) / base)
    return float(np.mean(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="samples per set (the demo judges 1000)")
    parser.add_argument("--model", help="a model directory to score over --sets sets")
    parser.add_argument("--sets", type=int, default=4, help="sets of --n samples for --model")
    parser.add_argument("--steps", type=int, help="sampler steps for --model (default: the model's own)")
    args = parser.parse_args()
    cfg = load_config()
    data = load_dataset(cfg.data)
    judge = fit_judge(data, cfg.evaluate)
    print(f"digits, n = {args.n}, judge seed {cfg.evaluate.seed}; FD ratio (lower is closer to the training set)")
    cycled, anyway = judge.copier_ratio(data.labels, args.n), judge.copier_ratio(None, args.n)
    print(
        f"  copies, labels in turn:   mean {cycled['mean']:.2f} over 20 sets (one set: "
        f"{cycled['min']:.2f}-{cycled['max']:.2f})"
    )
    print(f"  copies, labels at random: mean {anyway['mean']:.2f} ({anyway['min']:.2f}-{anyway['max']:.2f})")
    for noise in (0.5, 1.0, 1.25, 1.5, 2.0):
        r = noisy_copies(judge, data.images, data.labels, args.n, noise, cfg.evaluate.seed)
        print(
            f"  copies + noise sd {noise} (of 0..16): FD ratio {r['fd_ratio']:.2f}, "
            f"near-copies {r['near_copy_share']:.1%}"
        )
    heldout = Judge.heldout_real_ratio(data.images, pca_components=cfg.evaluate.pca_components, seed=cfg.evaluate.seed)
    print(f"  new real digits (held-out third, 2:1 split): {heldout:.2f}")
    gauss = gaussian_new_data_ratio(judge.real_features, args.n, cfg.evaluate.seed)
    print(f"  fresh Gaussian draws, n vs {len(data.images)}: {gauss:.2f}")
    if args.model:
        from sdpipe.models import load_model
        from sdpipe.sampling.generate import model_sample_spec

        model = load_model(args.model)
        spec = model_sample_spec(model.meta.config, model.scheduler_config, args.steps, None, None)
        rows = [
            sample_and_score(model, judge, spec, args.n, k * 10**6, show_progress=False)
            for k in range(1, args.sets + 1)
        ]
        fds = [r["fd_ratio"] for r in rows]
        print(
            f"  {args.model} ({spec.sampler}, {spec.steps} steps, guidance {spec.guidance:g}): mean {np.mean(fds):.2f} "
            f"over {args.sets} sets ({', '.join(f'{f:.2f}' for f in fds)}); label accuracy "
            f"{np.mean([r['label_accuracy'] for r in rows]):.1%}, near-copies "
            f"{np.mean([r['near_copy_share'] for r in rows]):.1%}"
        )


if __name__ == "__main__":
    main()
