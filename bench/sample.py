"""Sampling speed: sdpipe's default generation against a plain diffusers loop, on the same saved model.

    .venv/bin/python bench/sample.py --model runs/demo/model [--n 1000] [--threads N] [--no-compile]

Both make the same n class-conditional digits (labels cycling 0..9) at the model's guidance scale:

- plain: the loop from the README (DDIM, 50 steps, `torch.no_grad`, eager), in batches of `--batch` images;
         for an EDM-preconditioned model (the default recipe) DDIM does not apply, and the plain loop uses
         diffusers' EDMEulerScheduler instead: DDIM's counterpart, first-order steps of the same ODE;
- ours:  `sdpipe.sampling.generate` with the model's own settings (sampler, steps, micro-batch), the UNet in
         channels_last memory format and compiled with `torch.compile` (warm-up excluded, compile time shown),
         under `torch.inference_mode`; and, for reference, `generate` as shipped (eager).

The three are timed in interleaved rounds (`--repeats`) and each keeps its fastest, since the machine may be
shared.

It prints images/s and quality (FID, precision/recall in sdpipe's feature network, the judge's FD ratio and
label accuracy) for both, the UNet's FLOPs per image per step (torch.utils.flop_counter) and the achieved
FLOP/s against a measured float32 matrix-multiply peak of this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_edm_euler import EDMEulerScheduler
from torch.utils.flop_counter import FlopCounterMode

from sdpipe.config import load_config
from sdpipe.data.imageset import split_arrays
from sdpipe.evaluate.features import load_or_train_feature_net, real_features, source_to_pixels
from sdpipe.evaluate.judge import Judge
from sdpipe.evaluate.metrics import fid_kid, precision_recall
from sdpipe.evaluate.run import fit_judge
from sdpipe.models import LoadedModel, load_model
from sdpipe.sampling import SampleSpec, generate
from sdpipe.sampling.files import pixels_to_source, to_pixels


def matmul_peak(size: int = 1024, repeats: int = 10) -> float:
    """Best float32 FLOP/s of a size x size matrix multiply on this machine, this thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def unet_flops_per_image(model: LoadedModel, batch: int, guided: bool) -> float:
    """FLOPs of one denoising step per image (both halves of a classifier-free-guidance batch counted)."""
    m = model.meta
    rows = 2 * batch if guided else batch
    x = torch.randn(rows, m.channels, m.image_size, m.image_size)
    labels = torch.zeros(rows, dtype=torch.long)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.unet(x, torch.tensor(500), class_labels=labels)
    return counter.get_total_flops() / batch


def plain_diffusers(
    model: LoadedModel, labels: torch.Tensor, guidance: float, batch: int, steps: int = 50
) -> torch.Tensor:
    """The README's vanilla loop with DDIM (EDM Euler for EDM models) and classifier-free guidance: no sdpipe code."""
    m = model.meta
    edm = "sigma_data" in model.scheduler_config
    sched = (EDMEulerScheduler if edm else DDIMScheduler).from_config(model.scheduler_config)
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(0, len(labels), batch):
        y = labels[i : i + batch]
        x = torch.randn(len(y), m.channels, m.image_size, m.image_size, generator=gen) * sched.init_noise_sigma
        sched.set_timesteps(steps)
        with torch.no_grad():
            for t in sched.timesteps:
                if guidance == 1.0:
                    eps = model.unet(sched.scale_model_input(x, t), t, class_labels=y).sample
                else:
                    null = torch.full_like(y, m.null_label or 0)
                    inp = torch.cat([x, x])
                    c, u = model.unet(inp, t, class_labels=torch.cat([y, null])).sample.chunk(2)
                    eps = u + guidance * (c - u)
                x = sched.step(eps, t, x).prev_sample
        out.append(x)
    return torch.cat(out)


def ours(model: LoadedModel, spec: SampleSpec, labels: list[int], seed: int) -> torch.Tensor:
    m = model.meta
    shape = (m.channels, m.image_size, m.image_size)
    seeds = list(range(seed, seed + len(labels)))
    return generate(model.unet, model.scheduler_config, seeds, labels, shape=shape, null_label=m.null_label, spec=spec)


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    t = time.perf_counter()
    x = fn()
    return x, time.perf_counter() - t


def quality(x: torch.Tensor, labels: np.ndarray, model: LoadedModel, judge: Judge, scorer: dict) -> dict:
    px = to_pixels(x, model.meta.value_range)
    feats = scorer["net"].features(px)
    judged = judge.score(pixels_to_source(px, model.meta.value_range), labels)
    return {
        **{k: v for k, v in fid_kid(scorer["real"], feats).items() if k != "kid_subset_size"},
        **precision_recall(scorer["real"], feats),
        "fd_ratio": judged["fd_ratio"],
        "label_accuracy": judged["label_accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=None, help="plain loop's batch (default: our micro-batch)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    ap.add_argument("--no-compile", action="store_true", help="ours without torch.compile")
    ap.add_argument("--steps", type=int, default=None, help="our sampling steps (default: the model's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; each setup's fastest is kept")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    c = model.meta.config["sample"]
    spec = SampleSpec(c["sampler"], args.steps or c["steps"], c["guidance"], c["micro_batch"])
    batch = args.batch or spec.micro_batch
    n_classes = len(model.meta.class_names or [])
    labels = [i % n_classes for i in range(args.n)]
    cfg = load_config()
    data, heldout = split_arrays(cfg.data, "train"), split_arrays(cfg.data, "test")  # the judge's two parts
    real_px = source_to_pixels(data.images, data.value_range)
    net = load_or_train_feature_net(real_px, data.labels, len(data.class_names), data.dataset_id)
    held_px = source_to_pixels(heldout.images, heldout.value_range)
    scorer = {"net": net, "real": real_features(net, held_px, heldout.dataset_id)}
    judge = fit_judge(data, heldout, cfg.evaluate)
    results: dict = {"threads": torch.get_num_threads(), "n": args.n, "guidance": spec.guidance}

    fast = load_model(args.model)  # a second copy: channels_last (+ compiled); `model` stays as shipped
    fast.unet = fast.unet.to(memory_format=torch.channels_last)
    compile_s = 0.0
    if not args.no_compile:
        fast.unet = torch.compile(fast.unet)
        _, compile_s = timed(lambda: ours(fast, spec, labels[: spec.micro_batch], seed=10**6))  # warm-up

    # the machine may be shared: interleave the three and keep each one's fastest round
    runs = {
        "plain": lambda: plain_diffusers(model, torch.tensor(labels), spec.guidance, batch),
        "ours_eager": lambda: ours(model, spec, labels, seed=0),
        "ours": lambda: ours(fast, spec, labels, seed=0),
    }
    best: dict[str, float] = {}
    images: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            images[name], seconds = timed(run)
            best[name] = min(best.get(name, float("inf")), seconds)
    vr = model.meta.value_range
    setup = f"sdpipe {spec.sampler} x{spec.steps}, micro-batch {spec.micro_batch}, inference_mode"
    plain_name = "EDM Euler" if "sigma_data" in model.scheduler_config else "DDIM"
    results["plain"] = {"setup": f"diffusers {plain_name} x50, no_grad, eager, batch {batch}"}
    results["ours_eager"] = {"setup": setup + " (generate as shipped: eager)"}
    results["ours"] = {
        "setup": setup + ", channels_last" + ("" if args.no_compile else ", torch.compile"),
        "compile_warmup_s": compile_s,
        "bitwise_equal_to_eager": bool(torch.equal(images["ours"], images["ours_eager"])),
        "png_pixels_equal_to_eager": bool(
            np.array_equal(to_pixels(images["ours"], vr), to_pixels(images["ours_eager"], vr))
        ),
    }
    for name in runs:
        results[name]["images_per_s"] = args.n / best[name]
        results[name].update(quality(images[name], np.array(labels), model, judge, scorer))
    results["speedup"] = results["ours"]["images_per_s"] / results["plain"]["images_per_s"]

    peak = matmul_peak()
    flops = unet_flops_per_image(load_model(args.model), spec.micro_batch, spec.guidance != 1.0)
    results["flops"] = {
        "unet_flops_per_image_step": flops,
        "matmul_peak_flop_s": peak,
        "ours_flop_s": flops * spec.steps * results["ours"]["images_per_s"],
        "plain_flop_s": flops * 50 * results["plain"]["images_per_s"],
    }
    results["flops"]["ours_share_of_peak"] = results["flops"]["ours_flop_s"] / peak
    results["flops"]["plain_share_of_peak"] = results["flops"]["plain_flop_s"] / peak
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
