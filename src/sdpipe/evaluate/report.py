"""A self-contained HTML report: metrics, loss curve and sample grid as inline pictures, config, timings."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def loss_series(history: list[dict]) -> tuple[str, np.ndarray, np.ndarray]:
    """(key, steps, values) of the loss the curve draws: `denoising_loss` where every row has it."""
    key = "denoising_loss" if history and all("denoising_loss" in r for r in history) else "loss"
    return key, np.array([r["step"] for r in history]), np.array([r[key] for r in history])


def loss_curve(history: list[dict], validations: list[dict] | None = None) -> str:
    """The plain denoising loss per step (`denoising_loss`; older runs: `loss`) and its running mean, with the
    validation losses when there are any. Not the optimized objective: with the learned uncertainty weighting
    that goes negative, which a log axis cannot show, and it is not comparable across runs."""
    key, steps, loss = loss_series(history)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, loss, lw=0.5, alpha=0.4, label="denoising loss" if key == "denoising_loss" else "loss")
    if len(loss) >= 20:
        k = max(len(loss) // 50, 5)
        ax.plot(steps[k - 1 :], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
    if validations:
        ax.plot([v["step"] for v in validations], [v["val_loss"] for v in validations], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("denoising loss (plain, unweighted)" if key == "denoising_loss" else "training loss")
    if (loss > 0).all():
        ax.set_yscale("log")
    ax.legend()
    return _png(fig)


def quality_curve(evaluations: list[dict]) -> str:
    """`train.eval_every` results: FD ratio and label accuracy against the training step."""
    steps = [e["step"] for e in evaluations]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, [e["fd_ratio"] for e in evaluations], "o-", label="FD ratio (lower is better)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("FD ratio")
    if all("label_accuracy" in e for e in evaluations):
        acc = ax.twinx()
        acc.plot(steps, [e["label_accuracy"] for e in evaluations], "s--", color="tab:green", label="label accuracy")
        acc.set_ylabel("label accuracy")
        acc.set_ylim(0, 1)
    ax.legend(loc="upper right")
    return _png(fig)


def sample_grid(pixels: np.ndarray, rows: int, row_names: list[str] | None = None) -> str:
    """uint8 images (N, H, W) laid out in `rows` rows."""
    cols = int(np.ceil(len(pixels) / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.5, rows * 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(pixels):
            ax.imshow(pixels[i], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    if row_names:
        for r, name in enumerate(row_names[:rows]):
            axes[r, 0].text(-1, 3.5, name, ha="right", va="center", fontsize=8)
    return _png(fig)


def _table(rows: list[dict], keys: list[str]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r, k)}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(row: dict, key: str) -> str:
    """A row's value, with its 95 % interval over sample sets where the row has one."""
    iv = row.get("intervals", {}).get(key)
    if iv is None or iv["low"] == iv["high"]:
        return _fmt(row.get(key))
    return f"{iv['mean']:.4g} <small>({iv['low']:.3g}&ndash;{iv['high']:.3g})</small>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{html.escape(str(k))} {_fmt(x)}" for k, x in v.items())
    return html.escape(str(v))


JUDGE_KEYS = [
    "sampler", "steps", "guidance", "sets", "fd_ratio", "two_sample_accuracy", "two_sample_accuracy_real",
    "near_copy_share", "label_accuracy", "images_per_s",
]  # fmt: skip
INTERVAL_NOTE = (
    "<p>Against the held-out part, which the model never trained on; each figure is the mean over independent "
    "sample sets, with its 95 % interval in brackets. FD ratio 1.0 and two-sample accuracy 0.5 are what real "
    "training images score.</p>"
)


def _quality_parts(ev: dict) -> list[str]:
    judge = "".join(f"<li>{html.escape(k)}: {_fmt(v)}</li>" for k, v in ev["judge"].items())
    per_class = ev["default"].get("label_accuracy_per_class", {})
    return [
        "<h2>Quality (default generate settings)</h2>",
        INTERVAL_NOTE,
        _table([ev["default"]], JUDGE_KEYS),
        "<h2>Guidance sweep</h2>",
        _table(ev["guidance_sweep"], JUDGE_KEYS),
        "<h3>Accuracy per class (first sample set)</h3>",
        _table([per_class], list(per_class)) if per_class else "",
        f"<h3>How it was judged</h3><ul>{judge}</ul>",
    ]


def write_report(
    path: str | Path,
    *,
    title: str,
    metrics: dict,
    history: list[dict],
    grid_pixels: np.ndarray,
    grid_rows: int,
    row_names: list[str] | None,
    config: dict,
    timings: dict[str, float],
) -> Path:
    ev = metrics.get("evaluation")  # None for a training run's report: no judge, just training
    all_events = metrics.get("train", {}).get("events", [])
    validations = [e for e in all_events if e["event"] == "validation"]
    evaluations = [e for e in all_events if e["event"] == "evaluation"]
    events = [e for e in all_events if e["event"] not in ("validation", "evaluation")]  # skipped steps, rollbacks
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        *(_quality_parts(ev) if ev else []),
        "<h2>Training events</h2>",
        _table(events, ["step", "event", "consecutive", "to_step", "lr_scale"]) if events else "<p>none</p>",
        "<h2>Training loss</h2>",
        f'<img alt="loss curve" src="{loss_curve(history, validations)}">',
        "<h2>Quality during training</h2>" if evaluations else "",
        f'<img alt="quality over training" src="{quality_curve(evaluations)}">' if evaluations else "",
        "<h2>Samples</h2>",
        f'<img alt="sample grid" src="{sample_grid(grid_pixels, grid_rows, row_names)}">',
        "<h2>Timings (seconds)</h2>",
        _table([timings], list(timings)),
        "<h2>Config</h2>",
        f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>",
    ]
    return _write_html(path, title, parts)


def steps_plot(sweep: list[dict]) -> str:
    """FID and images/s against sampling steps, one line per sampler."""
    fig, (q, s) = plt.subplots(1, 2, figsize=(9, 3.2))
    for sampler in dict.fromkeys(r["sampler"] for r in sweep):
        rows = sorted((r for r in sweep if r["sampler"] == sampler), key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        q.plot(steps, [r["fid"] for r in rows], marker="o", label=sampler)
        s.plot(steps, [r["images_per_s"] for r in rows], marker="o", label=sampler)
    ticks = sorted({r["steps"] for r in sweep})
    for ax, name in ((q, "FID (lower is better)"), (s, "images/s")):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(name)
    q.legend()
    return _png(fig)


def pairs_picture(pairs: list[tuple[np.ndarray, np.ndarray, float]]) -> str:
    """Closest (sample, training image) pairs: samples on top, their nearest training images below."""
    fig, axes = plt.subplots(2, len(pairs), figsize=(len(pairs) * 0.9, 2.1), squeeze=False)
    for i, (sample, train, dist) in enumerate(pairs):
        for row, img in ((0, sample), (1, train)):
            ax = axes[row, i]
            ax.imshow(img, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, i].set_title(f"{dist:.2f}", fontsize=7)
    axes[0, 0].set_ylabel("sample", fontsize=7)
    axes[1, 0].set_ylabel("training", fontsize=7)
    return _png(fig)


def trajectory_picture(traj: np.ndarray, max_columns: int = 10) -> str:
    """x0 predictions (samples, steps, H, W[, C]): one row per sample, evenly spaced steps left to right."""
    n_steps = traj.shape[1]
    cols = np.unique(np.linspace(0, n_steps - 1, min(max_columns, n_steps)).round().astype(int))
    fig, axes = plt.subplots(len(traj), len(cols), figsize=(len(cols) * 0.7, len(traj) * 0.75), squeeze=False)
    for r in range(len(traj)):
        for c, step in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(traj[r, step], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
            ax.axis("off")
            if r == 0:
                ax.set_title(f"step {step + 1}", fontsize=6)
    return _png(fig)


def attention_picture(final: np.ndarray, maps: dict[str, np.ndarray]) -> str:
    """Each sample next to the attention its positions receive in every attention layer."""
    names = sorted(maps)
    fig, axes = plt.subplots(len(final), 1 + len(names), figsize=((1 + len(names)) * 1.1, len(final) * 1.1))
    axes = np.atleast_2d(axes)
    for r in range(len(final)):
        axes[r, 0].imshow(final[r], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        for c, name in enumerate(names, start=1):
            axes[r, c].imshow(maps[name][r], cmap="viridis", interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(name.replace(".attentions.", ".attn"), fontsize=5)
        for ax in axes[r]:
            ax.axis("off")
    axes[0, 0].set_title("sample", fontsize=6)
    return _png(fig)


def write_evaluation_report(path: str | Path, *, title: str, metrics: dict, pictures: dict, config: dict) -> Path:
    """The report of `sdpipe evaluate`: feature-space metrics (naming the features), classifier accuracy,
    memorization, quality versus steps, the judge's numbers, trajectories and attention maps."""
    ev, clf, memo = metrics["evaluation"], metrics["classifier"], metrics["memorization"]
    d = ev["default"]
    dist_keys = ["sampler", "steps", "guidance", "n", "fid", "kid_mean", "kid_std", "precision", "recall"]
    sweep_keys = list(metrics["steps_sweep"][0]) if metrics["steps_sweep"] else []
    features = metrics["features"]
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>model {_fmt(metrics['model'])}, trained on {_fmt(metrics['dataset_id'])}, judged against the held-out "
        f"part {_fmt(metrics.get('heldout_dataset_id'))}</p>",
        "<h2>Distribution metrics (default generate settings, against the held-out part)</h2>",
        INTERVAL_NOTE,
        f"<p><b>Features: {_fmt(features['name'])}</b>. {_fmt(features['description'])}</p>",
        _table([d], dist_keys),
        "<h2>Classifier accuracy on samples</h2>",
        f"<p>{_fmt(clf['what'])}; its accuracy on held-out real images: {_fmt(clf['heldout_real_accuracy'])}; "
        f"on the samples: {_fmt(clf['accuracy'])}.</p>",
        _table([clf["per_class"]], list(clf["per_class"])) if clf["per_class"] else "<p>unconditional model</p>",
        "<h2>Memorization</h2>",
        f"<p>near-copies: {_fmt(memo['near_copy_share'])} of the first sample set (L2 to the nearest training image "
        f"below {_fmt(memo['near_copy_threshold'])}, the distance that 99 % of the held-out images exceed). "
        "Closest pairs (L2 above each pair):</p>",
        f'<img alt="closest pairs" src="{pairs_picture(pictures["pairs"])}">' if pictures["pairs"] else "",
        "<h2>Quality versus sampling steps</h2>",
        _table(metrics["steps_sweep"], sweep_keys),
        f'<img alt="quality versus steps" src="{steps_plot(metrics["steps_sweep"])}">' if sweep_keys else "",
        "<h2>The judge (guidance sweep)</h2>",
        _table(ev["guidance_sweep"], JUDGE_KEYS),
        "<h2>Validation loss</h2>",
        _validation_loss(metrics["validation_loss"]),
        "<h2>Denoising trajectory (the model's clean-image prediction after each step)</h2>",
        f'<img alt="trajectory" src="{trajectory_picture(pictures["trajectory"])}">',
        "<h2>Attention maps (attention each position receives, middle step)</h2>",
        f'<img alt="attention" src="{attention_picture(pictures["final"], pictures["attention"])}">'
        if pictures["attention"]
        else "<p>this model has no attention layers</p>",
        "<h2>Timings (seconds)</h2>",
        _table([metrics["timings_s"]], list(metrics["timings_s"])),
        "<h2>Model config</h2>",
        f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>",
    ]
    return _write_html(path, title, parts)


def _validation_loss(v: dict) -> str:
    if v.get("value") is None:
        return f"<p>not measured: {_fmt(v.get('why'))}</p>"
    return f"<p>{_fmt(v['value'])} on {_fmt(v['images'])} images, {_fmt(v['on'])}, noise seed {_fmt(v['seed'])}</p>"


def _write_html(path: str | Path, title: str, parts: list[str]) -> Path:
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
    )
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    path = Path(path)
    path.write_text(doc)
    return path
