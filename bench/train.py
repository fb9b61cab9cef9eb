"""Training benchmark: sdpipe's default recipe against a plain diffusers training loop, same model, one run.

    python bench/train.py                     # plain loop for 240 s; sdpipe at 37, 40, 47 and 100 % of its steps
    python bench/train.py --seeds 0 1 2 --fractions 0.37 0.42  # both loops from 3 training seeds, FD averaged
    python bench/train.py --budget 60 --n 300 --sets 1 --fractions 0.2  # a quick look

The plain loop is what one writes in an afternoon from the diffusers docs: the same UNet2DModel, DDPMScheduler
(cosine schedule, v-prediction), AdamW at a constant 1e-3 after a short warmup, diffusers' EMAModel with its
default warmup, 10% label dropout, batch 128; sampled with DPM-Solver++ (20 steps, no guidance). The two UNets
have the same architecture and weights count; they differ only in the fixed frequencies of the sinusoidal
timestep embedding, which each recipe matches to the timesteps it feeds the network: diffusers' default (1 down
to 1e-4) for the plain loop's 0..999, and 1 up to 1000 for sdpipe's EDM c_noise = ln(sigma)/4, about -1.6..1.1
(`sdpipe.train.recipe.time_embedding_max_frequency`). Both are
scored by the foundation's judge (src/sdpipe/evaluate/judge.py: FD ratio, label accuracy, near-copies) on
`--sets` sets of `--n` samples each (sample seeds 1e6.., 2e6.., ...; the FD ratio of one set of 1000 swings by
about +-0.3 from set to set, so the mean over sets is what is compared); evaluation time is not counted as
training time. Prints samples/s and, for each checkpoint, the training seconds and the mean FD ratio, then the
goal: sdpipe reaches the plain loop's final quality in at most a third of its time.

One training run is one draw: at 555 steps sdpipe's FD ratio was 2.65 from training seed 0 and 3.09 from seed 1
(same recipe, same 4 sample sets). `--seeds` repeats the whole comparison per training seed (the seed of both
loops' initial weights and of every draw they make) and compares the means over seeds.

The two loops train in turns, a step or so each, until the plain loop has its budget: this machine's speed
swings by +-15 % from minute to minute, and run one after the other the loops met different spells of it (one
such run had the plain loop at 1092 samples/s and sdpipe at 912-994, while stepping in turns the same two
loops differ by 2-3 %). Taken in turns, both see the same spells, so their times compare.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from sdpipe.config import PipelineConfig, load_config
from sdpipe.data import open_split, to_model_range
from sdpipe.data.imageset import split_arrays
from sdpipe.evaluate.intervals import apart, fmt, interval, summarize
from sdpipe.evaluate.judge import Judge
from sdpipe.evaluate.run import fit_judge
from sdpipe.models import build_unet
from sdpipe.sampling import SampleSpec, generate
from sdpipe.sampling.files import pixels_to_source, to_pixels
from sdpipe.train import TrainResult, sampler_config, train

SPEC = SampleSpec("dpmpp_2m", 20, 1.0, 64)


def score(unet: torch.nn.Module, scheduler_config: dict, judge: Judge, n: int, sets: int) -> dict:
    """The judge's scores over `sets` sets of n samples (labels cycling): means, 95 % intervals, and each set's
    FD ratio."""
    labels = [i % 10 for i in range(n)]
    rows = []
    for k in range(1, sets + 1):
        seeds = list(range(k * 10**6, k * 10**6 + n))
        x = generate(unet, scheduler_config, seeds, labels, shape=(1, 8, 8), null_label=10, spec=SPEC)
        samples = pixels_to_source(to_pixels(x, (0.0, 16.0)), (0.0, 16.0))
        rows.append(judge.score(samples, np.array(labels)))
    summary = summarize(rows)
    return {**summary, "fd_ratio_per_set": summary["intervals"]["fd_ratio"]["values"]}


def per_set(scores: dict) -> str:
    return "(sets: " + ", ".join(f"{v:.2f}" for v in scores["fd_ratio_per_set"]) + ")"


class PlainLoop:
    """The afternoon loop, advanced a step at a time and scored when its training time passes each checkpoint."""

    def __init__(self, checkpoints: list[float], judge: Judge, n: int, sets: int, seed: int = 0) -> None:
        cfg = load_config()
        data = split_arrays(cfg.data, "train")  # the training part: the held-out quarter is the judge's
        torch.manual_seed(seed)  # the initial weights, as sdpipe's train() draws them for train.seed
        self.unet = build_unet(cfg.model, sample_size=8, channels=1, num_classes=10)
        self.gen = torch.Generator().manual_seed(seed)  # its own: sdpipe's runs reseed torch's global one
        self.sched = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
        )
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-3)
        self.warmup = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / 100))
        self.ema = EMAModel(self.unet.parameters(), use_ema_warmup=True, power=0.75)
        self.x_all = to_model_range(data.images, data.value_range)
        self.y_all = torch.as_tensor(data.labels)
        self.pending, self.judge, self.n, self.sets = sorted(checkpoints), judge, n, sets
        self.trained, self.steps = 0.0, 0
        self.results: list[dict] = []

    def step(self) -> None:
        start = time.perf_counter()
        idx = torch.randint(0, len(self.x_all), (128,), generator=self.gen)
        x0, y = self.x_all[idx], self.y_all[idx].clone()
        y[torch.rand(len(y), generator=self.gen) < 0.1] = 10
        noise = torch.randn(x0.shape, generator=self.gen)
        t = torch.randint(0, 1000, (len(x0),), generator=self.gen)
        pred = self.unet(self.sched.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, self.sched.get_velocity(x0, noise, t))
        loss.backward()
        self.opt.step()
        self.warmup.step()
        self.opt.zero_grad()
        self.ema.step(self.unet.parameters())
        self.steps += 1
        self.trained += time.perf_counter() - start
        if self.pending and self.trained >= self.pending[0]:
            self.pending.pop(0)
            self.ema.store(self.unet.parameters())
            self.ema.copy_to(self.unet.parameters())
            self.unet.eval()
            scores = score(self.unet, dict(self.sched.config), self.judge, self.n, self.sets)
            self.unet.train()
            self.ema.restore(self.unet.parameters())
            seconds, steps = self.trained, self.steps
            self.results.append({"seconds": seconds, "steps": steps, "samples_per_s": steps * 128 / seconds, **scores})
            print(
                f"  plain  {seconds:6.0f} s  {steps:5d} steps  FD ratio {scores['fd_ratio']:.3f} {per_set(scores)}",
                flush=True,
            )

    def train_until(self, seconds: float) -> None:
        """Step until this loop has trained `seconds` in all, or has passed its last checkpoint."""
        while self.pending and self.trained < seconds:
            self.step()


def train_in_turns(cfg: PipelineConfig, plain: PlainLoop, counted_before: float) -> tuple[TrainResult, float]:
    """One sdpipe training run; after each of its steps the plain loop steps until it has trained as long as
    sdpipe has in all (`counted_before` plus this run so far). Returns the result and this run's seconds: set-up,
    steps and final save, all but the time spent in the plain loop and its scoring."""
    elsewhere, begun = 0.0, time.perf_counter()

    def interleave(step: int, row: dict) -> None:
        nonlocal elsewhere
        paused = time.perf_counter()
        plain.train_until(counted_before + (paused - begun - elsewhere))
        elsewhere += time.perf_counter() - paused

    with tempfile.TemporaryDirectory() as run:
        result = train(cfg, open_split(cfg.data), run, progress=interleave)
    return result, time.perf_counter() - begun - elsewhere


def sdpipe_recipe(
    fractions: list[float], plain: PlainLoop, judge: Judge, n: int, sets: int, seed: int = 0
) -> list[dict]:
    """The default recipe with its schedule shortened to each fraction of the default steps, shortest first,
    each run in turns with the plain loop (see `train_in_turns`)."""
    results, total = [], 0.0
    for fraction in sorted(fractions):
        steps = max(1, round(load_config().train.steps * fraction))
        cfg = load_config(None, [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.seed={seed}"])
        result, seconds = train_in_turns(cfg, plain, total)
        total += seconds
        scores = score(result.unet, sampler_config(cfg), judge, n, sets)
        results.append({"seconds": seconds, "steps": steps, "samples_per_s": steps * 128 / seconds, **scores})
        print(
            f"  sdpipe {seconds:6.0f} s  {steps:5d} steps  FD ratio {scores['fd_ratio']:.3f} {per_set(scores)}",
            flush=True,
        )
    return results


def mean_over_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """Row i of each seed's results averaged (seconds, steps, samples/s, FD ratio, label accuracy), with the
    95 % interval of the FD ratio over every sample set of every seed."""
    keys = ("seconds", "steps", "samples_per_s", "fd_ratio", "label_accuracy")
    rows = []
    for i in range(len(per_seed[0])):
        row = {k: float(np.mean([runs[i][k] for runs in per_seed])) for k in keys}
        row["fd_interval"] = interval([v for runs in per_seed for v in runs[i]["fd_ratio_per_set"]])
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=240.0, help="plain loop's training seconds")
    parser.add_argument("--n", type=int, default=1000, help="samples per set judged at each checkpoint")
    parser.add_argument("--sets", type=int, default=4, help="sets of --n samples; their mean FD ratio is compared")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.37, 0.4, 0.47, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; means are compared")
    args = parser.parse_args()
    cfg = load_config()
    judge = fit_judge(split_arrays(cfg.data, "train"), split_arrays(cfg.data, "test"), cfg.evaluate)
    print(
        f"torch threads {torch.get_num_threads()}; judge: mean of {args.sets} sets of {args.n} samples, "
        "DPM-Solver++ 20 steps, guidance 1"
    )
    plain_runs, our_runs = [], []
    for seed in args.seeds:
        print(f"training seed {seed}", flush=True)
        plain = PlainLoop([args.budget / 4, args.budget / 2, args.budget], judge, args.n, args.sets, seed)
        our_runs.append(sdpipe_recipe(args.fractions, plain, judge, args.n, args.sets, seed))
        plain.train_until(args.budget)  # alone, if sdpipe's runs took less than the budget in all
        plain_runs.append(plain.results)
    target, ours = mean_over_seeds(plain_runs)[-1], mean_over_seeds(our_runs)
    over = f"mean of {len(args.seeds)} training seeds" if len(args.seeds) > 1 else f"training seed {args.seeds[0]}"
    print(
        f"\n{over}: plain loop {target['samples_per_s']:.0f} samples/s; FD ratio {fmt(target['fd_interval'], 3)} after "
        f"{target['seconds']:.0f} s, label accuracy {target['label_accuracy']:.1%}"
    )
    for r in ours:
        print(
            f"sdpipe {r['steps']:5.0f} steps: {r['samples_per_s']:.0f} samples/s, {r['seconds']:.0f} s, "
            f"FD ratio {fmt(r['fd_interval'], 3)}, label accuracy {r['label_accuracy']:.1%}; "
            + ("outside" if apart(r["fd_interval"], target["fd_interval"]) else "inside")
            + " the intervals of the plain loop's"
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
