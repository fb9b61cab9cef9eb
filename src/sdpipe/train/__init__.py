"""Train stage: the recipe (noise process, loss), the training loop, validation and checkpoints."""

from sdpipe.train.interrupt import TrainingInterrupted
from sdpipe.train.loop import TrainResult, train
from sdpipe.train.metrics import read_metrics
from sdpipe.train.recipe import make_objective, noise_scheduler, sampler_config
from sdpipe.train.validation import validation_loss

__all__ = [
    "TrainResult",
    "TrainingInterrupted",
    "make_objective",
    "noise_scheduler",
    "read_metrics",
    "sampler_config",
    "train",
    "validation_loss",
]
