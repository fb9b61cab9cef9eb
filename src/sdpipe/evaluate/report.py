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


def loss_curve(history: list[dict]) -> str:
    steps = np.array([r["step"] for r in history])
    loss = np.array([r["loss"] for r in history])
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, loss, lw=0.5, alpha=0.4, label="loss")
    if len(loss) >= 20:
        k = max(len(loss) // 50, 5)
        ax.plot(steps[k - 1 :], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
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
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


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
    ev = metrics["evaluation"]
    events = metrics.get("train", {}).get("events", [])  # non-finite steps skipped, rollbacks
    keys = ["sampler", "steps", "guidance", "fd_ratio", "label_accuracy", "near_copy_share", "images_per_s"]
    judge = "".join(f"<li>{html.escape(k)}: {_fmt(v)}</li>" for k, v in ev["judge"].items())
    per_class = ev["default"].get("label_accuracy_per_class", {})
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Quality (default generate settings)</h2>",
        _table([ev["default"]], keys),
        "<h2>Guidance sweep</h2>",
        _table(ev["guidance_sweep"], keys),
        "<h3>Accuracy per class</h3>",
        _table([per_class], list(per_class)) if per_class else "",
        f"<h3>How it was judged</h3><ul>{judge}</ul>",
        "<h2>Training events</h2>",
        _table(events, ["step", "event", "consecutive", "to_step", "lr_scale"]) if events else "<p>none</p>",
        "<h2>Training loss</h2>",
        f'<img alt="loss curve" src="{loss_curve(history)}">',
        "<h2>Samples</h2>",
        f'<img alt="sample grid" src="{sample_grid(grid_pixels, grid_rows, row_names)}">',
        "<h2>Timings (seconds)</h2>",
        _table([timings], list(timings)),
        "<h2>Config</h2>",
        f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>",
    ]
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
