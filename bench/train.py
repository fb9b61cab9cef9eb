"""Training benchmark: sdpipe's default recipe against a plain diffusers training loop, same model, one run.

    python bench/train.py                     # plain loop for 240 s; sdpipe at 40, 47, 53 and 100 % of its steps
    python bench/train.py --budget 60 --n 300 --sets 1 --fractions 0.2  # a quick look

The plain loop is what one writes in an afternoon from the diffusers docs: the same UNet2DModel, DDPMScheduler
(cosine schedule, v-prediction), AdamW at a constant 1e-3 after a short warmup, diffusers' EMAModel with its
default warmup, 10% label dropout, batch 128; sampled with DPM-Solver++ (20 steps, no guidance). Both are
scored by the foundation's judge (src/sdpipe/evaluate/judge.py: FD ratio, label accuracy, near-copies) on
`--sets` sets of `--n` samples each (sample seeds 1e6.., 2e6.., ...; the FD ratio of one set of 1000 swings by
about +-0.3 from set to set, so the mean over sets is what is compared); evaluation time is not counted as
training time. Prints samples/s and, for each checkpoint, the training seconds and the mean FD ratio, then the
goal: sdpipe reaches the plain loop's final quality in at most a third of its time.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from sdpipe.config import load_config
from sdpipe.data import load_dataset, open_split, to_model_range
from sdpipe.evaluate.judge import Judge
from sdpipe.models import build_unet
from sdpipe.sampling import SampleSpec, generate
from sdpipe.sampling.files import pixels_to_source, to_pixels
from sdpipe.train import sampler_config, train

SPEC = SampleSpec("dpmpp_2m", 20, 1.0, 64)


def score(unet: torch.nn.Module, scheduler_config: dict, judge: Judge, n: int, sets: int) -> dict:
    """The judge's scores averaged over `sets` sets of n samples (labels cycling), plus each set's FD ratio."""
    labels = [i % 10 for i in range(n)]
    rows = []
    for k in range(1, sets + 1):
        seeds = list(range(k * 10**6, k * 10**6 + n))
        x = generate(unet, scheduler_config, seeds, labels, shape=(1, 8, 8), null_label=10, spec=SPEC)
        samples = pixels_to_source(to_pixels(x, (0.0, 16.0)), (0.0, 16.0))
        rows.append(judge.score(samples, np.array(labels)))
    keys = ("fd_ratio", "label_accuracy", "near_copy_share")
    return {
        **{key: float(np.mean([r[key] for r in rows])) for key in keys},
        "fd_ratio_per_set": [r["fd_ratio"] for r in rows],
    }


def per_set(scores: dict) -> str:
    return "(sets: " + ", ".join(f"{v:.2f}" for v in scores["fd_ratio_per_set"]) + ")"


def plain_loop(budget_s: float, checkpoints: list[float], judge: Judge, n: int, sets: int) -> list[dict]:
    """The afternoon loop, scored at each of `checkpoints` seconds of training."""
    cfg = load_config()
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    unet = build_unet(cfg.model, sample_size=8, channels=1, num_classes=10)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    ema = EMAModel(unet.parameters(), use_ema_warmup=True, power=0.75)
    x_all, y_all = to_model_range(data.images, data.value_range), torch.as_tensor(data.labels)
    results, trained, steps, pending = [], 0.0, 0, sorted(checkpoints)
    while pending:
        start = time.perf_counter()
        idx = torch.randint(0, len(x_all), (128,))
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(len(y)) < 0.1] = 10
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(x0),))
        pred = unet(sched.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, sched.get_velocity(x0, noise, t))
        loss.backward()
        opt.step()
        warmup.step()
        opt.zero_grad()
        ema.step(unet.parameters())
        steps += 1
        trained += time.perf_counter() - start
        if trained >= pending[0]:
            pending.pop(0)
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
            unet.eval()
            scores = score(unet, dict(sched.config), judge, n, sets)
            unet.train()
            ema.restore(unet.parameters())
            results.append({"seconds": trained, "steps": steps, "samples_per_s": steps * 128 / trained, **scores})
            print(
                f"  plain  {trained:6.0f} s  {steps:5d} steps  FD ratio {scores['fd_ratio']:.3f} {per_set(scores)}",
                flush=True,
            )
    return results


def sdpipe_recipe(fractions: list[float], judge: Judge, n: int, sets: int) -> list[dict]:
    """The default recipe with its schedule shortened to each fraction of the default steps."""
    results = []
    for fraction in fractions:
        cfg = load_config()
        steps = max(1, round(cfg.train.steps * fraction))
        cfg = load_config(None, [f"train.steps={steps}", f"train.checkpoint_every={steps}"])
        with tempfile.TemporaryDirectory() as run:
            result = train(cfg, open_split(cfg.data), run)
        scores = score(result.unet, sampler_config(cfg), judge, n, sets)
        results.append(
            {"seconds": result.seconds, "steps": steps, "samples_per_s": result.samples_per_second, **scores}
        )
        print(
            f"  sdpipe {result.seconds:6.0f} s  {steps:5d} steps  FD ratio {scores['fd_ratio']:.3f} {per_set(scores)}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=240.0, help="plain loop's training seconds")
    parser.add_argument("--n", type=int, default=1000, help="samples per set judged at each checkpoint")
    parser.add_argument("--sets", type=int, default=4, help="sets of --n samples; their mean FD ratio is compared")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.4, 0.47, 0.53, 1.0])
    args = parser.parse_args()
    data = load_dataset(load_config().data)
    judge = Judge.fit(data.images, data.labels, pca_components=32, seed=1_000_000)
    print(
        f"torch threads {torch.get_num_threads()}; judge: mean of {args.sets} sets of {args.n} samples, "
        "DPM-Solver++ 20 steps, guidance 1"
    )
    plain = plain_loop(args.budget, [args.budget / 4, args.budget / 2, args.budget], judge, args.n, args.sets)
    ours = sdpipe_recipe(args.fractions, judge, args.n, args.sets)
    target = plain[-1]
    print(
        f"\nplain loop: {target['samples_per_s']:.0f} samples/s; FD ratio {target['fd_ratio']:.3f} after "
        f"{target['seconds']:.0f} s, label accuracy {target['label_accuracy']:.1%}"
    )
    for r in ours:
        print(
            f"sdpipe {r['steps']:5d} steps: {r['samples_per_s']:.0f} samples/s, {r['seconds']:.0f} s, "
            f"FD ratio {r['fd_ratio']:.3f}, label accuracy {r['label_accuracy']:.1%}"
        )
    reached = [r for r in ours if r["fd_ratio"] <= target["fd_ratio"]]
    if reached:
        first = min(reached, key=lambda r: r["seconds"])
        share = first["seconds"] / target["seconds"]
        verdict = "met" if share <= 1 / 3 else "not met"
        print(
            f"sdpipe reaches the plain loop's final FD ratio in {first['seconds']:.0f} s = {share:.0%} of its "
            f"time (goal <= 33%: {verdict})"
        )
    else:
        print("sdpipe does not reach the plain loop's final FD ratio at any measured length (goal not met)")


if __name__ == "__main__":
    main()
