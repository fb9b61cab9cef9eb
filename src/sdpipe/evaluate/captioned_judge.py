"""A text-to-image model judged on its data's held-out split by a judge fitted on real images only.

The data is a validated captioned folder with class labels (first-level folders, e.g. an emoji's category,
`data.emoji`). The judge is `evaluate.judge.Judge`, fitted on the training split's real images and labels, the
held-out real images its reference. For each of `sets` sample sets the model draws one image per held-out
caption (set k, caption i: seed `seed + k * n + i`, through the one generation path), captions it never
trained on. Figures, each a mean with a 95 % interval over the sets:

- prompt adherence: the share of samples the judge's classifier reads as the class of the caption they were
  asked for, beside the same classifier on the real held-out images (what a perfect model would score) and the
  held-out split's largest class share (what ignoring the caption scores at best);
- held-out quality: the Frechet ratio (1.0 = as close to the held-out images as real training images are) and
  the two-sample accuracy (0.5 = indistinguishable), each with its real-data reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdpipe.config import DataConfig
from sdpipe.evaluate.intervals import interval
from sdpipe.progress import progress_bar


def text_to_image_model(model: Path | Any) -> Any:
    """`model` if it is a `LoadedPipeline`, else the text-to-image model at that path."""
    from sdpipe.models.kinds import load_any
    from sdpipe.models.pipelines import LoadedPipeline

    loaded = model if isinstance(model, LoadedPipeline) else load_any(model)
    if not isinstance(loaded, LoadedPipeline):
        raise ValueError(f"{model}: not a text-to-image model")
    return loaded


def sample_prompts(
    model_dir: Path | Any,
    captions: list[str],
    steps: int,
    guidance: float,
    show_progress: bool,
    label: str = "sampling prompts",
    first_seed: int = 1_000_000,
    size: int = 32,
    sampler: str = "dpmpp_2m",
) -> np.ndarray:
    """One `size` x `size` RGB image (uint8, N x H x W x 3) per caption, image i from its own seed
    `first_seed + i`, through the one generation path (a LoRA run's model samples with its LoRA); `model_dir`
    a model's path or its `LoadedPipeline`."""
    from sdpipe.conditioning import Conditioning
    from sdpipe.sampling.generate import Row, SampleSpec, generate_items
    from sdpipe.sampling.sd_records import to_rgb8

    model = text_to_image_model(model_dir)
    cond = [Conditioning(prompt=c, width=size, height=size, loras=model.default_loras) for c in captions]
    rows = [Row(first_seed + i, c) for i, c in enumerate(cond)]
    spec = SampleSpec(sampler, steps, guidance, micro_batch=16)
    with progress_bar(label, len(rows), show_progress) as advance:
        out = generate_items(model.parts, rows, spec, progress=lambda n: advance(n))
    return np.stack([to_rgb8(out[r]) for r in rows])


# what held-out captions are sampled with when the model records no `sample` section (models saved before it did)
DEFAULT_SAMPLING = {"sampler": "dpmpp_2m", "steps": 20, "guidance": 3.0}


def training_record(model_dir: Path) -> dict[str, Any]:
    """sdpipe_training.json of a text-to-image model sdpipe trained, which must hold its data section."""
    import json

    record = Path(model_dir) / "sdpipe_training.json"
    if not record.is_file() or "data" not in (training := json.loads(record.read_text())):
        raise ValueError(f"{model_dir}: no sdpipe_training.json with its data section; --held-out judges models "
                         "sdpipe trained (train.method full or scratch) on a validated folder")  # fmt: skip
    return dict(training)


def training_data(model_dir: Path) -> DataConfig:
    """The data section a text-to-image model sdpipe trained records (sdpipe_training.json)."""
    return DataConfig.model_validate(training_record(model_dir)["data"])


def recorded_sampling(model_dir: Path) -> dict[str, Any]:
    """The sampler, steps and guidance of the run's `sample` section as the model records them, else
    `DEFAULT_SAMPLING`; `from` says which."""
    sample = training_record(model_dir).get("sample")
    if sample is None:
        return {**DEFAULT_SAMPLING, "from": "sdpipe's defaults (the model records no sample section)"}
    return {k: sample[k] for k in DEFAULT_SAMPLING} | {"from": "the run's sample section"}


def write_held_out(out: Path, figures: dict[str, Any]) -> list[str]:
    """OUT/held_out.json, and the summary lines to print."""
    import json

    from sdpipe.evaluate.intervals import fmt

    out.mkdir(parents=True, exist_ok=True)
    (out / "held_out.json").write_text(json.dumps(figures, indent=2) + "\n")
    return [
        f"{figures['sets']} sets of {figures['n_per_set']} held-out captions; {_sampling_line(figures['sampling'])}",
        f"prompt adherence {fmt(figures['prompt_adherence'], 1, percent=True)} (real held-out images "
        f"{figures['prompt_adherence_real']:.1%}, largest class {figures['prompt_adherence_chance']:.1%})",
        f"FD ratio {fmt(figures['fd_ratio'])} (1.0 = as close as real training images)",
        f"two-sample accuracy {fmt(figures['two_sample_accuracy'], 3)} (real {figures['two_sample_accuracy_real']:.3f};"
        " 0.5 = indistinguishable)",
        f"figures: {out / 'held_out.json'}",
    ]


def _sampling_line(s: dict[str, Any]) -> str:
    return f"{s['sampler']}, {s['steps']} steps, guidance {s['guidance']:g} ({s['from']})"


def judge_held_out(
    model_dir: str | Path | Any,
    data: DataConfig,
    *,
    sets: int = 4,
    sampling: dict[str, Any] | None = None,
    seed: int = 1_000_000,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The figures above for the model at `model_dir` (or that `LoadedPipeline`) on `data`'s held-out ("test")
    split, sampled with `sampling` ({sampler, steps, guidance}; None: what the model records, `recorded_sampling`)."""
    from sdpipe.data import open_split
    from sdpipe.data.imageset import split_arrays
    from sdpipe.evaluate.judge import Judge

    train, test = split_arrays(data, "train"), split_arrays(data, "test")
    if len(test.labels) < 10 or not test.class_names:
        raise ValueError("the held-out split needs at least 10 labelled images: set data.test_fraction and give "
                         "the folder class subfolders (see sdpipe.data.emoji)")  # fmt: skip
    captions = open_split(data, "test").captions
    model = text_to_image_model(model_dir)
    sampling = sampling or recorded_sampling(model.path)
    judge = Judge.fit(train.images, train.labels, test.images, value_range=train.value_range, seed=0)
    size, n = int(test.images.shape[-1]), len(captions)
    rows = []
    for k in range(sets):
        images = sample_prompts(
            model, [c or "" for c in captions], sampling["steps"], sampling["guidance"], show_progress,
            f"sampling held-out captions (set {k + 1} of {sets})", seed + k * n, size, sampling["sampler"],
        )  # fmt: skip
        rows.append(judge.score(images.transpose(0, 3, 1, 2).astype(np.float32), test.labels))
    chance = float(np.bincount(test.labels).max() / len(test.labels))
    return {
        "n_per_set": n,
        "sets": sets,
        "sampling": sampling,
        "classes": test.class_names,
        "prompt_adherence": interval([r["label_accuracy"] for r in rows]),
        "prompt_adherence_real": judge.heldout_accuracy(test.labels),
        "prompt_adherence_chance": chance,
        "fd_ratio": interval([r["fd_ratio"] for r in rows]),
        "two_sample_accuracy": interval([r["two_sample_accuracy"] for r in rows]),
        "two_sample_accuracy_real": rows[0]["two_sample_accuracy_real"],
        "judge": judge.describe(),
    }
