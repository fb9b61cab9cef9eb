"""The judge's figures as the terminal shows them after `sdpipe demo` and `sdpipe evaluate`: each the mean over
the sample sets ± the half-width of its 95 % interval (metrics.json and the report give the interval's ends).
Plain fixed-width lines, so the table fits 80 columns wherever it is printed (a terminal, a CI log)."""

from __future__ import annotations

COLUMNS = (  # (header, key, digits, percent, width)
    ("FD ratio", "fd_ratio", 2, False, 11),
    ("two-sample", "two_sample_accuracy", 2, False, 11),
    ("copies", "near_copy_share", 1, True, 11),
    ("accuracy", "label_accuracy", 1, True, 13),
)


def _cell(row: dict, key: str, digits: int, percent: bool) -> str:
    iv = row.get("intervals", {}).get(key)
    scale, unit = (100.0, " %") if percent else (1.0, "")
    if iv is not None and len(iv["values"]) > 1:  # the t-interval is symmetric: mean ± half its width
        return f"{iv['mean'] * scale:.{digits}f} ± {(iv['high'] - iv['mean']) * scale:.{digits}f}{unit}"
    value = row.get(key)
    return "-" if value is None else f"{value * scale:.{digits}f}{unit}"


def judge_table(metrics: dict, title: str) -> str:
    """A title line, a header and one line per guidance scale: sampler, steps, guidance, each figure, img/s."""
    head = f"{'sampler':>9} {'steps':>5} {'g':>4} " + " ".join(f"{c[0]:>{c[4]}}" for c in COLUMNS) + f" {'img/s':>6}"
    lines = [title, head, "-" * len(head)]
    for r in metrics["evaluation"]["guidance_sweep"]:
        cells = " ".join(f"{_cell(r, key, d, pc):>{w}}" for _, key, d, pc, w in COLUMNS)
        lines.append(f"{r['sampler']:>9} {r['steps']:>5} {r['guidance']:>4g} {cells} {r['images_per_s']:>6.0f}")
    return "\n".join(lines)


def scale_line(metrics: dict) -> str | None:
    """What real data scores, for scale (`None` when the metrics predate the held-out judge)."""
    judge = metrics["evaluation"].get("judge", {})
    if "heldout_images" not in judge:
        return None
    real = metrics["evaluation"]["default"].get("two_sample_accuracy_real")
    return (
        f"mean ± 95 % interval over {metrics['evaluation']['default'].get('sets', 1)} sample sets, against "
        f"{judge['heldout_images']} held-out images the model never trained on (judge fitted on "
        f"{judge['training_images']} training images); real training images score FD ratio 1.0 and two-sample "
        f"{real:.2f}"
    )
