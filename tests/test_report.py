"""The report draws what can be compared: the plain denoising loss, and each figure with its interval."""

from __future__ import annotations

import numpy as np

from sdpipe.evaluate.intervals import summarize
from sdpipe.evaluate.report import _cell, loss_series, write_report


def test_the_loss_curve_draws_the_plain_denoising_loss() -> None:
    # with the learned uncertainty weighting the optimized objective goes negative: a log axis drops it
    history = [{"step": s, "loss": -0.5 - s / 100, "denoising_loss": 0.2 + 1 / s} for s in range(1, 31)]
    key, steps, values = loss_series(history)
    assert key == "denoising_loss" and (values > 0).all() and steps.tolist() == list(range(1, 31))
    assert loss_series([{"step": 1, "loss": 0.3}])[0] == "loss"  # runs logged before it


def test_figures_show_their_interval(tmp_path) -> None:
    rows = [{"sampler": "euler", "steps": 14, "guidance": 1.0, "fd_ratio": v, "images_per_s": 100.0} for v in (1, 2)]
    row = summarize(rows)
    assert _cell(row, "fd_ratio") == "1.5 <small>(-4.85&ndash;7.85)</small>"
    assert _cell(row, "sampler") == "euler"
    history = [{"step": s, "loss": -1.0, "denoising_loss": 0.5} for s in range(1, 5)]
    ev = {"default": row, "guidance_sweep": [row], "judge": {"heldout_images": 450}}
    path = write_report(
        tmp_path / "r.html", title="t", metrics={"evaluation": ev}, history=history,
        grid_pixels=np.zeros((4, 8, 8), np.uint8), grid_rows=2, row_names=None, config={}, timings={"total": 1.0},
    )  # fmt: skip
    text = path.read_text()
    assert "95 % interval" in text and "(-4.85&ndash;7.85)" in text
    training_only = write_report(
        tmp_path / "t.html", title="t", metrics={"train": {"events": []}}, history=history,
        grid_pixels=np.zeros((4, 8, 8), np.uint8), grid_rows=2, row_names=None, config={}, timings={},
    )  # fmt: skip
    assert "Training loss" in training_only.read_text() and "Guidance sweep" not in training_only.read_text()
