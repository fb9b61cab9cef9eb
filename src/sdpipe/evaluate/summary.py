"""The judge's figures as the terminal shows them after `sdpipe demo` and `sdpipe evaluate`: each the mean over
the sample sets with its 95 % interval."""

from __future__ import annotations

from rich.table import Table

from sdpipe.evaluate.intervals import fmt

COLUMNS = (  # (header, key, digits, percent)
    ("FD ratio", "fd_ratio", 2, False),
    ("two-sample", "two_sample_accuracy", 3, False),
    ("near-copies", "near_copy_share", 1, True),
    ("accuracy", "label_accuracy", 1, True),
)


def _cell(row: dict, key: str, digits: int, percent: bool) -> str:
    iv = row.get("intervals", {}).get(key)
    if iv is not None:
        return fmt(iv, digits, percent)
    value = row.get(key)
    if value is None:
        return "-"
    return f"{value * 100:.{digits}f} %" if percent else f"{value:.{digits}f}"


def judge_table(metrics: dict, title: str) -> Table:
    """One row per guidance scale: sampler, steps, guidance, sets, then each figure with its interval."""
    table = Table(title=title)
    for col in ("sampler", "steps", "guidance", "sets", *(c[0] for c in COLUMNS), "img/s"):
        table.add_column(col, justify="right")
    for r in metrics["evaluation"]["guidance_sweep"]:
        cells = [_cell(r, key, digits, percent) for _, key, digits, percent in COLUMNS]
        table.add_row(r["sampler"], str(r["steps"]), f"{r['guidance']:g}", str(r.get("sets", 1)), *cells,
                      f"{r['images_per_s']:.0f}")  # fmt: skip
    return table


def scale_line(metrics: dict) -> str | None:
    """What real data scores, for scale (`None` when the metrics predate the held-out judge)."""
    judge = metrics["evaluation"].get("judge", {})
    if "heldout_images" not in judge:
        return None
    real = metrics["evaluation"]["default"].get("two_sample_accuracy_real")
    return (
        f"judged against {judge['heldout_images']} held-out images the model never trained on (fitted on "
        f"{judge['training_images']} training images); real training images score FD ratio 1.0 and two-sample "
        f"{real:.3f}; mean (95 % interval) over {metrics['evaluation']['default'].get('sets', 1)} sample sets"
    )
