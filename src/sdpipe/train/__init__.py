"""Train stage: losses, the training loop and its checkpoints."""

from sdpipe.train.loop import TrainResult, noise_scheduler, train

__all__ = ["TrainResult", "noise_scheduler", "train"]
