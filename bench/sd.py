"""Text-to-image speed: `sdpipe generate` against a vanilla diffusers pipeline call, same model and settings.

    .venv/bin/python bench/sd.py [--arch dummy ldm] [--device cpu|cuda] [--steps 20] [--size 64] [--n 2]
                                 [--repeats 10] [--micro-batch 1] [--sampler dpmpp_2m] [--threads 1] [--json FILE]

Builds tiny random Stable Diffusion 1.x folders with the test suite's builder (`tests/sd_fixtures.py`, nothing
downloaded): `dummy`, diffusers' dummy shapes (2-level UNet 32/64, 2-level VAE, so 64x64 images are 32x32
latents), where per-call overheads weigh most; and `ldm`, the real SD layout at small width (4-level UNet
32/32/64/64 with attention in three levels, 4-level VAE with factor 8), where the network dominates as it does in
real Stable Diffusion. Each folder is loaded once (`sdpipe.models.pipelines.load_pipeline`) and both sides use
that same pipeline object, so components, dtype and device are the same. Per round, n images (prompts cycling,
seeds S..S+n-1, each image its own CPU generator) are made four ways:

- `vanilla pipe()`:          `pipe(prompt=[...], generator=[one per image], output_type="pt")`, `--micro-batch`
                             images a call, with a fresh scheduler built as sdpipe builds it;
- `vanilla pipe() + PNGs`:   the same with `output_type="pil"` and each image saved as a PNG;
- `sdpipe generate_items`:   sdpipe's generation path (`sdpipe.sampling.generate.generate_items`), in memory;
- `sdpipe generate`:         `sdpipe.sampling.files.generate_files`, what the command runs once the model is loaded:
                             PNGs with their metadata chunks and samples.jsonl.

Rounds are interleaved (the variants' order rotates) after one untimed warm-up round, so all four meet the same
spells of a shared machine. Each round starts sdpipe with an empty prompt-embedding cache, as a new process
would. Time per image is the median over rounds (with min-max) of wall time, and of this process's CPU time
(`time.process_time`; with one torch thread on a shared CPU it counts only our own work, so it swings far less
with the machine's load than wall time). sdpipe's overhead is its paired per-round ratio to the matching vanilla
variant, as a mean with a 95 % Student-t interval over rounds, in wall and in CPU time. Peak memory: on a GPU
`torch.cuda.max_memory_allocated` above what was allocated before the variant ran; on the CPU the peak resident
set (Linux VmHWM, reset through /proc/self/clear_refs) above the resident set before it, with glibc's mmap
threshold pinned so freed tensors go back to the system and a later variant cannot hide in an earlier one's pages.
The warm-up also checks that both sides made the same images (max abs difference, 0..1 scale).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sd_fixtures import tiny_pipeline  # noqa: E402  (the test suite's offline tiny-model builder)
from sdpipe.conditioning import Conditioning  # noqa: E402
from sdpipe.evaluate.intervals import interval  # noqa: E402
from sdpipe.models.pipelines import LoadedPipeline, load_pipeline  # noqa: E402
from sdpipe.sampling.files import generate_files  # noqa: E402
from sdpipe.sampling.generate import Row, SampleSpec, generate_items  # noqa: E402
from sdpipe.sampling.schedulers import pipeline_scheduler  # noqa: E402

PROMPTS = ["a red circle on a white table", "two blue squares", "a green triangle at dusk", "a yellow star"]
VARIANTS = ("vanilla pipe()", "vanilla pipe() + PNGs", "sdpipe generate_items", "sdpipe generate")
PAIRS = (("sdpipe generate", "vanilla pipe() + PNGs"), ("sdpipe generate_items", "vanilla pipe()"))
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


# --------------------------------------------------------------------------- memory


class Memory:
    """Peak memory of one call above the level before it: CUDA allocator stats on a GPU, else peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.libc = None
        if not self.cuda:
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                self.libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # fixed: no dynamic threshold hiding reuse
            except OSError:
                self.libc = None
        self.how = "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS (VmHWM) above RSS before"

    @staticmethod
    def _status(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    def measure(self, fn: Callable[[], object]) -> tuple[float, float, float]:
        """(wall seconds, CPU seconds of this process, peak bytes above the start) of fn()."""
        gc.collect()
        base: int | None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            if self.libc is not None:
                self.libc.malloc_trim(0)
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
                base = self._status("VmRSS")
            except OSError:  # not Linux: no resettable peak; memory is not measured
                base = None
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if self.cuda:
            return wall, cpu, float(torch.cuda.max_memory_allocated() - (base or 0))
        return wall, cpu, float("nan") if base is None else float(self._status("VmHWM") - base)


# --------------------------------------------------------------------------- the four ways


def vanilla(model: LoadedPipeline, spec: SampleSpec, prompts: list[str], seed: int, size: int, pil: bool) -> list:
    """The images from `pipe(...)` itself, `spec.micro_batch` a call, one CPU generator per image."""
    pipe, out = model.pipe, []
    saved = pipe.scheduler
    try:
        for start in range(0, len(prompts), spec.micro_batch):
            chunk = prompts[start : start + spec.micro_batch]
            seeds = [seed + start + i for i in range(len(chunk))]
            pipe.scheduler = pipeline_scheduler(spec.sampler, model.scheduler_config, seeds)
            images = pipe(
                prompt=chunk,
                height=size,
                width=size,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type="pil" if pil else "pt",
            ).images
            out.extend(images if pil else list(images.cpu()))
    finally:
        pipe.scheduler = saved
    return out


def vanilla_pngs(model: LoadedPipeline, spec: SampleSpec, prompts: list[str], seed: int, size: int, folder: Path):
    images = vanilla(model, spec, prompts, seed, size, pil=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:05d}.png")
    return images


def conditions(prompts: list[str], size: int) -> list[Conditioning]:
    return [Conditioning(prompt=p, width=size, height=size) for p in prompts]


def fresh(model: LoadedPipeline) -> LoadedPipeline:
    """The model with an empty prompt-embedding cache, as a new `sdpipe generate` process has it."""
    model._parts = None
    return model


def ours_items(model: LoadedPipeline, spec: SampleSpec, prompts: list[str], seed: int, size: int) -> list:
    rows = [Row(seed + i, c) for i, c in enumerate(conditions(prompts, size))]
    images = generate_items(fresh(model).parts, rows, spec)
    return [images[r] for r in rows]


def ours_files(model: LoadedPipeline, spec: SampleSpec, prompts: list[str], seed: int, size: int, folder: Path):
    conds = conditions(prompts, size)
    n = len(prompts)
    return generate_files(fresh(model), folder, n=n, seed=seed, spec=spec, conditions=conds, show_progress=False)


# --------------------------------------------------------------------------- the bench


def same_images(model: LoadedPipeline, spec: SampleSpec, prompts: list[str], seed: int, size: int) -> float:
    """Max abs difference (0..1) between sdpipe's and the vanilla call's images."""
    theirs = torch.stack(vanilla(model, spec, prompts, seed, size, pil=False)).float()
    mine = (torch.stack(ours_items(model, spec, prompts, seed, size)).float().clamp(-1, 1) + 1) / 2
    return float((theirs - mine).abs().max())


def bench_arch(arch: str, args: argparse.Namespace, work: Path) -> dict:
    device = torch.device(args.device)
    t = time.perf_counter()
    folder = tiny_pipeline("sd1", work / f"sd1-{arch}", seed=0, single_file=arch == "ldm")
    model = load_pipeline(folder, device=args.device, dtype=args.dtype)
    model.micro_batch = args.micro_batch
    build_s = time.perf_counter() - t
    spec = SampleSpec(args.sampler, args.steps, args.guidance, args.micro_batch)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.n)]
    memory = Memory(device)
    out_dirs = {v: work / f"{arch}-{i}" for i, v in enumerate(VARIANTS)}
    for d in out_dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    run: dict[str, Callable[[], object]] = {
        VARIANTS[0]: lambda: vanilla(model, spec, prompts, args.seed, args.size, pil=False),
        VARIANTS[1]: lambda: vanilla_pngs(model, spec, prompts, args.seed, args.size, out_dirs[VARIANTS[1]]),
        VARIANTS[2]: lambda: ours_items(model, spec, prompts, args.seed, args.size),
        VARIANTS[3]: lambda: ours_files(model, spec, prompts, args.seed, args.size, out_dirs[VARIANTS[3]]),
    }
    with torch.inference_mode():
        max_diff = same_images(model, spec, prompts[: min(2, args.n)], args.seed, args.size)
    for fn in run.values():  # warm-up round, untimed
        fn()
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for v in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:
            w, c, peak = memory.measure(run[v])
            wall[v].append(w / args.n)
            cpu[v].append(c / args.n)
            peaks[v].append(peak)
    rows = {
        v: {
            "s_per_image_median": statistics.median(wall[v]),
            "s_per_image_min": min(wall[v]),
            "s_per_image_max": max(wall[v]),
            "s_per_image": wall[v],
            "cpu_s_per_image_median": statistics.median(cpu[v]),
            "cpu_s_per_image": cpu[v],
            "peak_mib_median": statistics.median(peaks[v]) / 2**20,
            "peak_mib": [p / 2**20 for p in peaks[v]],
        }
        for v in VARIANTS
    }

    def paired(times: dict[str, list[float]]) -> dict[str, dict]:
        return {
            f"{a} vs {b}": interval([100 * (x / y - 1) for x, y in zip(times[a], times[b], strict=True)])
            for a, b in PAIRS
        }

    overhead, overhead_cpu = paired(wall), paired(cpu)
    best_of = {f"{a} vs {b}": 100 * (min(wall[a]) / min(wall[b]) - 1) for a, b in PAIRS}
    unet = sum(p.numel() for p in model.pipe.unet.parameters())
    return {
        "arch": arch,
        "unet_parameters": unet,
        "latent": f"{model.parts.sample_shape(conditions(prompts, args.size)[0])}",
        "build_and_load_s": build_s,
        "max_abs_diff_vs_vanilla": max_diff,
        "variants": rows,
        "overhead_percent": overhead,
        "overhead_percent_cpu_time": overhead_cpu,
        "overhead_percent_fastest_rounds": best_of,
        "memory": memory.how,
    }


def table(result: dict, args: argparse.Namespace) -> str:
    head = f"{'':24} {'ms/image':>9} {'(min-max)':>17} {'CPU ms':>8} {'peak MiB':>9} {'vs vanilla':>11}"
    lines = [
        f"{result['arch']}: UNet {result['unet_parameters'] / 1e6:.2f} M parameters, latents {result['latent']}; "
        f"{args.n} images {args.size}x{args.size}, {args.sampler} x{args.steps}, guidance {args.guidance:g}, "
        f"micro-batch {args.micro_batch}, {args.device}, {torch.get_num_threads()} thread(s); "
        f"sdpipe vs vanilla images differ by at most {result['max_abs_diff_vs_vanilla']:.1e}",
        head,
        "-" * len(head),
    ]
    base = dict(PAIRS)
    for v, row in result["variants"].items():
        ref = base.get(v)
        vs = "" if ref is None else f"{result['overhead_percent'][f'{v} vs {ref}']['mean']:+.1f} %"
        spread = f"({row['s_per_image_min'] * 1e3:.1f}-{row['s_per_image_max'] * 1e3:.1f})"
        lines.append(
            f"{v:24} {row['s_per_image_median'] * 1e3:>9.1f} {spread:>17} {row['cpu_s_per_image_median'] * 1e3:>8.1f} "
            f"{row['peak_mib_median']:>9.1f} {vs:>11}"
        )
    for pair, iv in result["overhead_percent"].items():
        fastest = result["overhead_percent_fastest_rounds"][pair]
        c = result["overhead_percent_cpu_time"][pair]
        lines.append(
            f"overhead of {pair}: wall {_pm(iv)}, fastest rounds {fastest:+.1f} %; CPU time {_pm(c)} "
            f"({len(iv['values'])} paired rounds)"
        )
    lines.append(f"peak memory: {result['memory']}, median over rounds; intervals: 95 %, over the paired rounds")
    return "\n".join(lines)


def _pm(iv: dict) -> str:
    return f"{iv['mean']:+.1f} % ({iv['low']:+.1f} to {iv['high']:+.1f})"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--arch", nargs="+", choices=["dummy", "ldm"], default=["dummy", "ldm"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    ap.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (a multiple of 8)")
    ap.add_argument("--n", type=int, default=2, help="images per variant per round (short rounds pair better)")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds (after one warm-up round)")
    ap.add_argument("--micro-batch", type=int, default=1, help="images per network call, both sides")
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: this machine is shared)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.size % 8:
        raise SystemExit(f"--size {args.size}: give a multiple of 8")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-sd-") as tmp:
        for arch in args.arch:
            result = bench_arch(arch, args, Path(tmp))
            results.append(result)
            print(table(result, args), flush=True)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
