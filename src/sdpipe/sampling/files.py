"""Write generated images as PNGs in the source's size and intensities, with `samples.jsonl` beside them.

Every PNG carries its generation parameters in two text chunks: `parameters`, a human-readable line in the
style the Stable Diffusion web UIs write, and `sdpipe`, JSON with everything `replay` needs to regenerate
the image bit for bit (model hash and path, seed, label, sampler, steps, guidance, micro-batch, version).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from sdpipe import __version__
from sdpipe.conditioning import Conditioning
from sdpipe.data import to_source_range
from sdpipe.models import LoadedModel, load_model, weights_hash
from sdpipe.models.pipelines import LoadedPipeline
from sdpipe.progress import progress_bar
from sdpipe.sampling.generate import Row, SampleSpec, generate_items


def to_pixels(x: torch.Tensor, value_range: tuple[float, float]) -> np.ndarray:
    """Model-range images (N, C, H, W) -> uint8 (N, H, W[, C]): source value v -> round((v-lo)*255/(hi-lo))."""
    lo, hi = value_range
    v = to_source_range(x, value_range).numpy()
    px = np.round((v - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    return px[:, 0] if px.shape[1] == 1 else px.transpose(0, 2, 3, 1)


def pixels_to_source(px: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """uint8 pixels -> source intensities, the inverse of `to_pixels` up to rounding."""
    lo, hi = value_range
    return px.astype(np.float64) * (hi - lo) / 255.0 + lo


def parse_labels(label: str, n: int, class_names: list[str] | None) -> list[int] | None:
    """`'all'` cycles through every class; a class name or index repeats it; None for unconditional models."""
    if class_names is None:
        if label not in ("all", ""):
            raise ValueError("this model is unconditional: it takes no --label")
        return None
    if label == "all":
        return [i % len(class_names) for i in range(n)]
    if label in class_names:
        return [class_names.index(label)] * n
    raise ValueError(f"unknown label {label!r}: choose one of {', '.join(class_names)} or 'all'")


def label_conditioning(class_names: list[str] | None, label: int | None) -> Conditioning:
    """A pixel-space class model's conditioning for label index `label` (None: unconditional)."""
    return Conditioning(label=None if label is None or class_names is None else class_names[label])


def generate_files(
    model: LoadedModel | LoadedPipeline,
    out: str | Path,
    *,
    label: str = "all",
    n: int,
    seed: int,
    spec: SampleSpec,
    conditions: list[Conditioning] | None = None,
    batch_size: int = 1000,
    show_progress: bool = True,
) -> list[dict]:
    """Generate n images with seeds seed..seed+n-1 into `out`; returns the samples.jsonl records.

    Image i is conditioned on `conditions[i]` (text-to-image models), or on the label `label` gives it (pixel
    class models). `batch_size` images are held in memory and written at a time; it never changes an image,
    because the network always runs on fixed micro-batches (see `sdpipe.sampling.generate`)."""
    if n < 1:
        raise ValueError("--n must be at least 1")
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    conds = conditions if conditions is not None else pixel_conditions(model, label, n)
    if len(conds) != n:
        raise ValueError(f"{n} images but {len(conds)} conditionings")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    parts = model.parts
    with progress_bar("generating", n, show_progress) as advance:
        for start in range(0, n, batch_size):
            rows = [Row(seed + i, conds[i]) for i in range(start, min(n, start + batch_size))]
            images = generate_items(parts, rows, spec, progress=advance)
            for i, row in enumerate(rows, start):
                name = f"{i:05d}.png"
                data, rec = image_file(model, row, images[row], spec)
                (out / name).write_bytes(data)
                records.append({"file": name, **rec})
    with (out / "samples.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def pixel_conditions(model: LoadedModel | LoadedPipeline, label: str, n: int) -> list[Conditioning]:
    """A pixel-space class model's conditionings for --label (text-to-image models take prompts instead)."""
    if not isinstance(model, LoadedModel):
        raise ValueError("a text-to-image model takes --prompt or --prompts, not --label")
    names = model.meta.class_names
    labels = parse_labels(label, n, names)
    return [label_conditioning(names, None if labels is None else labels[i]) for i in range(n)]


def image_file(
    model: LoadedModel | LoadedPipeline, row: Row, image: torch.Tensor, spec: SampleSpec
) -> tuple[bytes, dict]:
    """One image's PNG bytes (with its metadata chunks) and its samples.jsonl record."""
    if isinstance(model, LoadedPipeline):
        from sdpipe.sampling import sd_records

        return encode_png(sd_records.to_rgb8(image), sd_records.png_info(model, row, spec)), sd_records.record(
            model, row, spec
        )
    names = model.meta.class_names
    label = None if row.cond.label is None or names is None else names.index(row.cond.label)
    rec = sample_record(model, label, row.seed, spec)
    px = to_pixels(image[None], model.meta.value_range)[0]
    return encode_png(px, png_info(rec, model, spec)), rec


def sample_record(model: LoadedModel, label: int | None, seed: int, spec: SampleSpec) -> dict:
    """What one image was made with (a samples.jsonl record without its file name)."""
    names = model.meta.class_names
    return {
        "label": None if label is None or names is None else names[label],
        "seed": seed,
        "steps": spec.steps,
        "sampler": spec.sampler,
        "guidance": spec.guidance,
        "model": model.meta.weights_hash,
    }


def encode_png(pixels: np.ndarray, info: PngImagePlugin.PngInfo) -> bytes:
    """uint8 pixels (H, W[, C]) as PNG file bytes carrying the text chunks of `info` (see `png_info`)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def png_info(record: dict, model: LoadedModel, spec: SampleSpec) -> PngImagePlugin.PngInfo:
    """The `parameters` (web-UI style) and `sdpipe` (JSON) text chunks for one generated image."""
    size = model.meta.image_size
    params = (
        f"label: {record['label']}\n"
        f"Steps: {spec.steps}, Sampler: {spec.sampler}, CFG scale: {spec.guidance}, Seed: {record['seed']}, "
        f"Size: {size}x{size}, Model hash: {record['model']}, Model: {model.path.name}, Version: sdpipe {__version__}"
    )
    exact = {
        "model_hash": record["model"],
        "model_path": str(model.path.resolve()),
        "seed": record["seed"],
        "label": record["label"],
        "sampler": spec.sampler,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "micro_batch": spec.micro_batch,
        "sdpipe_version": __version__,
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params)
    info.add_text("sdpipe", json.dumps(exact))
    return info


def read_png_params(path: str | Path) -> dict:
    """The `sdpipe` JSON chunk of a PNG written by `generate_files`; a clear error for any other PNG."""
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}))
    if "sdpipe" not in text:
        raise ValueError(f"{path} has no sdpipe generation parameters (was it written by `sdpipe generate`?)")
    return json.loads(text["sdpipe"])


def replay(
    png: str | Path, out: str | Path, model_path: str | Path | LoadedModel | LoadedPipeline | None = None
) -> Path:
    """Regenerate the image `png` from the parameters it carries, into `out`; returns the new file.

    The model is the one the PNG names (or `model_path`, a path or an already loaded model); its weights must
    hash to the recorded value. A text-to-image PNG is made again on the device type and in the dtype it
    records."""
    p = read_png_params(png)
    spec = SampleSpec(p["sampler"], p["steps"], p["guidance"], p["micro_batch"])
    if p.get("format") == 2:
        return _replay_pipeline(p, spec, out, model_path)
    model = model_path if isinstance(model_path, LoadedModel) else load_model(str(model_path or p["model_path"]))
    found = weights_hash(model.unet)  # the weights themselves, not what sdpipe.json says of them
    if found != p["model_hash"]:
        raise ValueError(
            f"model {model.path} has weights {found}, the image was made with "
            f"{p['model_hash']}: pass the right model with --model"
        )
    label = "all" if p["label"] is None else p["label"]
    generate_files(model, out, label=label, n=1, seed=p["seed"], spec=spec, show_progress=False)
    return Path(out) / "00000.png"


def _replay_pipeline(
    p: dict, spec: SampleSpec, out: str | Path, model_path: str | Path | LoadedModel | LoadedPipeline | None
) -> Path:
    from sdpipe.models.kinds import load_any

    if isinstance(model_path, LoadedModel):
        raise ValueError(f"the image was made by a {p['kind']} model, not a pixel-space class model")
    if isinstance(model_path, LoadedPipeline):
        model: LoadedModel | LoadedPipeline = model_path
    else:
        model = load_any(model_path or p["model_path"], device=p["device"], dtype=p["dtype"])
    if not isinstance(model, LoadedPipeline) or model.hash != p["model_hash"]:
        found = model.hash if isinstance(model, LoadedPipeline) else "a pixel-space class model"
        raise ValueError(
            f"model {model.path} is {found}, the image was made with {p['model_hash']}: "
            "pass the right model with --model"
        )
    model.save_memory(**p.get("memory", {}))
    cond = Conditioning.model_validate(p["conditioning"])
    generate_files(model, out, n=1, seed=p["seed"], spec=spec, conditions=[cond], show_progress=False)
    return Path(out) / "00000.png"
