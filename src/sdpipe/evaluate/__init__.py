"""Evaluate stage: an independent judge fitted on real data, and the HTML report."""

from sdpipe.evaluate.judge import Judge, frechet_distance

__all__ = ["Judge", "frechet_distance"]
