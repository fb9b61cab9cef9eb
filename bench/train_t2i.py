"""Text-to-image LoRA training speed and memory: sdpipe against a loop written like diffusers' example script.

    .venv/bin/python bench/train_t2i.py [--steps 10] [--batch-size 4] [--resolution 64] [--rank 4] [--runs 3]
                                        [--threads 2] [--images 32] [--ema-loop] [--json FILE]

Model: the test suite's tiny random SD1 pipeline (`tests/sd_fixtures.py`, `tiny_pipeline("sd1", ...)`, nothing
downloaded): UNet2DConditionModel with block_out_channels (32, 64), 2 layers per block, cross-attention in the
lower level (width 32); a 2-level VAE (32, 64; factor 2, so 64x64 images are 32x32x4 latents); a 5-layer CLIP
text encoder of width 32. Data: `--images` 96x96 PNGs (a coloured square on black, one of 16 captions each),
resized to `--resolution` on both sides.

Variants, each run alone in a fresh Python process (so its peak RSS is its own), `--runs` rounds with the order
rotating:

- `diffusers loop`: written after diffusers' examples/text_to_image/train_text_to_image_lora.py (its defaults:
  AdamW lr 1e-4, betas 0.9/0.999, weight decay 1e-2, eps 1e-8, constant LR, no warmup, max_grad_norm 1, plain
  MSE on epsilon, no noise offset, no SNR weighting, no EMA): components loaded one by one from the folder,
  `unet.add_adapter(LoraConfig(r, lora_alpha=r, gaussian init, to_q/to_k/to_v/to_out.0))`, accelerate's
  `prepare`/`accumulate`/`backward`/`clip_grad_norm_`, a torch DataLoader (0 workers, shuffled) that opens,
  lanczos-resizes, crops, normalises and tokenizes each image every step, then every step `vae.encode(...)`
  `.latent_dist.sample()`, `text_encoder(input_ids)`, `noise_scheduler.add_noise`, UNet, `F.mse_loss`, and the
  script's per-step `loss.item()`. One deliberate difference: the script hands `clip_grad_norm_` a `filter`
  object that the optimizer has already used up, so it clips nothing; here the LoRA parameters are a list and
  the clipping is real, as in sdpipe.
- `diffusers loop + EMA` (only with `--ema-loop`: a whole extra process per round): the same with
  `diffusers.training_utils.EMAModel` over the LoRA parameters, stepped after each optimizer step as
  train_text_to_image.py's `--use_ema` does (decay 0.9999, no warmup, foreach off, its default). sdpipe always
  keeps an EMA, so this is the like-for-like reference for that part. By default the EMA's cost is instead timed
  directly after the diffusers loop's run: 200 `EMAModel.step`s over its LoRA parameters, built as `--use_ema`
  builds it and as sdpipe's trainer does (foreach, warmup).
- `sdpipe cold`: `sdpipe.train.t2i_run.train_text_to_image` with train.method=lora and an empty cache folder:
  it encodes every image once (VAE posterior mean/std) and every caption once into the on-disk caches.
- `sdpipe warm`: the same, right after, with the cache the cold run wrote: a step reads latents and embeddings
  from the cache and encodes nothing.

sdpipe's settings for parity: diffusion.formulation=ddpm, train.loss_weighting=uniform,
train.uncertainty_weighting=false, timestep_sampling uniform, caption_dropout 0, lr 1e-4 constant, warmup 0,
weight decay 1e-2, grad_clip 1, the same rank/alpha/targets/init, no flips, one square bucket; its EMA (decay
0.999 with warmup power 0.67, foreach) stays on because it cannot be switched off. Its per-step metrics.jsonl
row is part of what it does each step, and is counted.

Time per step: the wall time from the end of step 1 to the end of step `--steps - 1`, over those steps (step 1
is warm-up; sdpipe checkpoints at the last step, which is left out, as the script's checkpoint interval of 500
never falls in such a short run). samples/s = batch size / time per step. Setup: the process's time from before
loading the model to the start of step 1 (sdpipe: its cache pass, timed alone as well). Memory: the peak of the
steps above the level at the end of step 1 (CPU: peak RSS, Linux VmHWM reset through /proc/self/clear_refs, with
glibc's mmap threshold pinned so freed tensors go back to the system; CUDA: torch.cuda.max_memory_allocated
above memory_allocated), and the whole process's peak RSS (ru_maxrss: imports, model, caches and training).
Means over rounds with 95 % Student-t intervals (sdpipe.evaluate.intervals.interval); sdpipe's ratio to the
diffusers loop is the mean of per-round ratios with its interval (and the median). CPU time per step
(`time.process_time`, all threads) is printed beside the wall time: on a shared machine it swings less with
the other work's load than wall time does, though spinning OpenMP threads still inflate it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

COLOURS = {
    "red": (230, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 30),
}  # fmt: skip
PLACES = ("on black", "in the corner", "at the centre", "near the edge")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


# --------------------------------------------------------------------------- memory (in a worker)


class Memory:
    """The peak above a mark: CUDA allocator stats on a GPU, else peak RSS (VmHWM reset at the mark)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.base = cuda, 0
        if not cuda:
            with contextlib.suppress(OSError):
                ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)

    @staticmethod
    def _status(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    def mark(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = self._status("VmRSS")
        except OSError:
            self.base = -1

    def peak(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - self.base)
        return float("nan") if self.base < 0 else float(self._status("VmHWM") - self.base)


class Clock:
    """Timestamps at the end of each step; the window is steps 2..N-1."""

    def __init__(self, steps: int, memory: Memory) -> None:
        self.steps, self.memory, self.ends, self.cpu, self.losses = steps, memory, {}, {}, []
        self.step_peak = float("nan")

    def step_done(self, step: int, loss: float) -> None:
        self.ends[step], self.cpu[step] = time.perf_counter(), time.process_time()
        self.losses.append(loss)
        if step == 1:
            self.memory.mark()
        if step == self.steps - 1:
            self.step_peak = self.memory.peak()

    def per_step(self) -> float:
        last = self.steps - 1
        return (self.ends[last] - self.ends[1]) / (last - 1)

    def cpu_per_step(self) -> float:
        last = self.steps - 1
        return (self.cpu[last] - self.cpu[1]) / (last - 1)


# --------------------------------------------------------------------------- the diffusers-style loop


def diffusers_loop(args: argparse.Namespace, clock: Clock, ema: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    base, images = Path(args.root) / "base", Path(args.root) / "images"
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    accelerator = Accelerator(mixed_precision="no")
    unet.to(accelerator.device)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    unet.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    files = sorted(images.glob("*.png"))
    captions = [f.with_suffix(".txt").read_text() for f in files]
    res = args.resolution

    def transform(path: Path) -> torch.Tensor:  # Resize(res, lanczos), RandomCrop(res), ToTensor, Normalize
        im = Image.open(path).convert("RGB")
        w, h = im.size
        s = res / min(w, h)
        im = im.resize((max(res, round(w * s)), max(res, round(h * s))), Image.Resampling.LANCZOS)
        left, top = (im.size[0] - res) // 2, (im.size[1] - res) // 2
        im = im.crop((left, top, left + res, top + res))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - 0.5) / 0.5

    class Captioned(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = tokenizer(
                [captions[i]], max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                return_tensors="pt",
            ).input_ids[0]  # fmt: skip
            return {"pixel_values": transform(files[i]), "input_ids": ids}

    def collate_fn(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([e["pixel_values"] for e in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        return {"pixel_values": pixel_values, "input_ids": torch.stack([e["input_ids"] for e in examples])}

    loader = torch.utils.data.DataLoader(
        Captioned(), shuffle=True, collate_fn=collate_fn, batch_size=args.batch_size, num_workers=0, drop_last=True
    )
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    ema_model = EMAModel(lora_layers, decay=0.9999) if ema else None
    if ema_model is not None:
        ema_model.to(accelerator.device)
    scaling = vae.config.scaling_factor
    steps_start = None
    step = 0
    unet.train()
    while step < args.steps:
        for batch in loader:
            if steps_start is None:
                steps_start = time.perf_counter()
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * scaling
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps.long())
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                train_loss = accelerator.gather(loss.repeat(args.batch_size)).mean().item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                if ema_model is not None:
                    ema_model.step(lora_layers)
                step += 1
                clock.step_done(step, train_loss)
            if step >= args.steps:
                break
    total = time.perf_counter() - start
    return {"setup_s": (steps_start or start) - start, "total_s": total, "ema_ms": ema_cost(lora_layers)}


def ema_cost(params: list[Any], n: int = 200) -> dict[str, float]:
    """Milliseconds per `EMAModel.step` over these (LoRA) parameters: as train_text_to_image.py's `--use_ema`
    builds it (decay 0.9999, no warmup, foreach off) and as sdpipe's trainer does (warmup power 0.67, foreach)."""
    from diffusers.training_utils import EMAModel

    out = {}
    for name, kw in (
        ("diffusers", {"decay": 0.9999}),
        ("sdpipe", {"decay": 0.999, "use_ema_warmup": True, "power": 0.67, "foreach": True}),
    ):
        ema = EMAModel(params, **kw)
        ema.step(params)
        t = time.perf_counter()
        for _ in range(n):
            ema.step(params)
        out[name] = 1000 * (time.perf_counter() - t) / n
    return out


# --------------------------------------------------------------------------- sdpipe


def sdpipe_sets(args: argparse.Namespace, cache: str) -> list[str]:
    root = Path(args.root)
    return [
        "model.type=text-to-image", f"model.pretrained={root / 'base'}", "train.method=lora",
        "diffusion.formulation=ddpm", "train.loss_weighting=uniform", "train.uncertainty_weighting=false",
        "train.timestep_sampling=uniform", "train.caption_dropout=0", "sample.sampler=euler",
        "data.source=folder", f"data.path={root / 'images'}", f"data.validated_dir={root / 'validated'}",
        f"data.resolution={args.resolution}", "data.buckets=false", "data.random_flip=false",
        "data.resize_filter=lanczos", f"train.batch_size={args.batch_size}", f"train.steps={args.steps}",
        f"train.checkpoint_every={args.steps}", "train.learning_rate=1e-4", "train.lr_schedule=constant",
        "train.warmup_steps=0", "train.weight_decay=0.01", "train.grad_clip=1.0", f"train.lora_rank={args.rank}",
        f"train.threads={args.threads}", f"train.seed={args.seed}", f"train.cache_dir={cache}",
    ]  # fmt: skip


def sdpipe_run(args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    from sdpipe.config import load_config
    from sdpipe.data import open_split
    from sdpipe.train import t2i
    from sdpipe.train.t2i_run import train_text_to_image

    marks: dict[str, float] = {}
    fill, draw = t2i.TextToImageTask._fill_caches, t2i.TextToImageTask.draw

    def timed_fill(self: Any, *a: Any, **k: Any) -> None:
        t = time.perf_counter()
        fill(self, *a, **k)
        marks["cache_s"] = marks.get("cache_s", 0.0) + time.perf_counter() - t

    def marked_draw(self: Any, *a: Any, **k: Any) -> Any:
        marks.setdefault("first_draw", time.perf_counter())
        return draw(self, *a, **k)

    t2i.TextToImageTask._fill_caches = timed_fill  # type: ignore[method-assign]
    t2i.TextToImageTask.draw = marked_draw  # type: ignore[method-assign]
    start = time.perf_counter()
    cfg = load_config(None, sdpipe_sets(args, args.cache))
    data = open_split(cfg.data)
    run = Path(tempfile.mkdtemp(dir=args.root, prefix="run-"))
    result = train_text_to_image(cfg, data, run, progress=lambda step, row: clock.step_done(step, row["loss"]))
    return {
        "setup_s": marks["first_draw"] - start,
        "cache_s": marks["cache_s"],
        "total_s": time.perf_counter() - start,
        "built": result.caches,
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    clock = Clock(args.steps, Memory(torch.cuda.is_available()))
    if args.worker == "sdpipe":
        out = sdpipe_run(args, clock)
    else:
        out = diffusers_loop(args, clock, ema=args.worker == "diffusers-ema")
    per_step = clock.per_step()
    out |= {
        "step_s": per_step,
        "samples_per_s": args.batch_size / per_step,
        "cpu_step_s": clock.cpu_per_step(),
        "step_peak_mib": clock.step_peak / 2**20,
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "last_loss": float(np.mean(clock.losses[-5:])),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(out))


# --------------------------------------------------------------------------- the parent


def write_images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    for i in range(n):
        colour, place = names[i % 4], PLACES[(i // 4) % 4]
        pixels = np.zeros((96, 96, 3), np.uint8)
        x, y = rng.integers(0, 96 - 36, size=2)
        pixels[y : y + 36, x : x + 36] = COLOURS[colour]
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {colour} square {place}")
    return folder


def prepare(root: Path, n: int) -> None:
    from sd_fixtures import tiny_pipeline  # the test suite's offline tiny-model builder
    from sdpipe.config import load_config
    from sdpipe.data.validate import validate

    tiny_pipeline("sd1", root / "base")
    write_images(root / "images", n)
    validate(str(root / "images"), root / "validated", load_config(None, []).data)


def spawn(args: argparse.Namespace, kind: str, root: Path, cache: Path) -> dict[str, Any]:
    out = root / f"result-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable, __file__, "--worker", kind, "--root", str(root), "--cache", str(cache), "--out", str(out),
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
        "--rank", str(args.rank), "--threads", str(args.threads), "--seed", str(args.seed),
    ]  # fmt: skip
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "SDPIPE_CACHE_DIR": str(root / "sdpipe-cache"),
        "SDPIPE_HOME": str(root / "sdpipe-home"),
        "PYTHONPATH": str(ROOT / "src"),
        "TQDM_DISABLE": "1",
    }
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text()) | {"process_s": time.perf_counter() - began}


def fmt(values: list[float], digits: int = 1) -> str:
    from sdpipe.evaluate.intervals import interval

    iv = interval(values)
    return (
        f"{iv['mean']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}] "
        f"med {statistics.median(values):.{digits}f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (steps 2..N-1 are timed)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    parser.add_argument("--runs", type=int, default=3, help="rounds; each runs every variant once")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads in every variant")
    parser.add_argument("--images", type=int, default=32, help="captioned training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema-loop", action="store_true", help="also run the diffusers loop + EMA variant")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be at least 4 (steps 2..N-1 are timed)")
    if args.worker:
        worker(args)
        return

    began = time.perf_counter()
    loops = ["diffusers", "sdpipe"] + (["diffusers-ema"] if args.ema_loop else [])
    names = {
        "diffusers": "diffusers loop",
        "diffusers-ema": "diffusers loop + EMA",
        "cold": "sdpipe cold cache",
        "warm": "sdpipe warm cache",
    }
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory(prefix="bench-t2i-") as tmp:
        root = Path(tmp)
        prepare(root, args.images)
        print(
            f"tiny SD1 (UNet 32/64, VAE 32/64, CLIP width 32), {args.images} images at {args.resolution}px, batch "
            f"{args.batch_size}, LoRA rank {args.rank}, {args.steps} steps, {args.threads} threads, {args.runs} "
            f"rounds; load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for r in range(args.runs):
            order = loops[r % len(loops) :] + loops[: r % len(loops)]
            for kind in order:
                if kind == "sdpipe":
                    cache = root / f"cache-{r}"
                    results["cold"].append(spawn(args, "sdpipe", root, cache))
                    results["warm"].append(spawn(args, "sdpipe", root, cache))
                    shown = ("cold", "warm")
                else:
                    results[kind].append(spawn(args, kind, root, root / "unused"))
                    shown = (kind,)
                for k in shown:
                    x = results[k][-1]
                    print(
                        f"  round {r + 1} {names[k]:22s} {x['samples_per_s']:6.1f} samples/s  "
                        f"{1000 * x['step_s']:6.1f} ms/step (CPU {1000 * x['cpu_step_s']:6.1f})  "
                        f"setup {x['setup_s']:5.2f} s  "
                        f"step peak {x['step_peak_mib']:6.1f} MiB  process peak {x['process_peak_mib']:6.0f} MiB  "
                        f"loss {x['last_loss']:.3f}  process {x['process_s']:.0f} s",
                        flush=True,
                    )
    device = results["warm"][0]["device"]
    peak = "CUDA max_memory_allocated" if device == "cuda" else "peak RSS"
    print(f"\nmean (95 % t interval) over {args.runs} rounds, {device}; step peak = {peak} above end of step 1")
    heads = ("samples/s", "wall ms/step", "CPU ms/step", "step peak MiB", "process peak MiB")
    print(f"{'variant':20s} " + " ".join(f"{h:>25s}" for h in heads))
    for k, rows in results.items():
        if not rows:
            continue
        cols = [
            fmt([x["samples_per_s"] for x in rows]),
            fmt([1000 * x["step_s"] for x in rows], 0),
            fmt([1000 * x["cpu_step_s"] for x in rows], 0),
            fmt([x["step_peak_mib"] for x in rows]),
            fmt([x["process_peak_mib"] for x in rows], 0),
        ]
        print(f"{names[k]:20s} " + " ".join(f"{c:>25s}" for c in cols))
    base = results["diffusers"]
    for k in ("warm", "cold", "diffusers-ema"):
        if results[k] and k != "diffusers":
            ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(results[k], base, strict=True)]
            cpu = [b["cpu_step_s"] / a["cpu_step_s"] for a, b in zip(results[k], base, strict=True)]
            print(
                f"{names[k]} / diffusers loop, per-round ratios: samples/s {fmt(ratios, 3)}; by CPU time {fmt(cpu, 3)}"
            )
    if results["diffusers-ema"] and results["warm"]:
        ratios = [
            a["samples_per_s"] / b["samples_per_s"]
            for a, b in zip(results["warm"], results["diffusers-ema"], strict=True)
        ]
        print(f"sdpipe warm cache / diffusers loop + EMA, samples/s: {fmt(ratios, 3)}")
    cold, warm = results["cold"], results["warm"]
    print(
        f"caches: cold pass {fmt([x['cache_s'] for x in cold], 2)} s (built {cold[0]['built']['latents']['built']} "
        f"latents, {cold[0]['built']['text']['built']} captions), warm pass {fmt([x['cache_s'] for x in warm], 3)} s "
        f"(built {warm[0]['built']['latents']['built']}); setup to step 1: cold "
        f"{fmt([x['setup_s'] for x in cold], 2)} s, warm {fmt([x['setup_s'] for x in warm], 2)} s, diffusers loop "
        f"{fmt([x['setup_s'] for x in base], 2)} s"
    )
    ema = [x["ema_ms"] for x in base]
    print(
        f"EMA over the LoRA parameters, ms per optimizer step: as --use_ema builds it "
        f"{fmt([e['diffusers'] for e in ema], 2)}, as sdpipe does (foreach) {fmt([e['sdpipe'] for e in ema], 2)}; "
        f"a step of the diffusers loop takes {fmt([1000 * x['step_s'] for x in base], 0)} ms"
    )
    print(f"bench wall time {time.perf_counter() - began:.0f} s; load {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
