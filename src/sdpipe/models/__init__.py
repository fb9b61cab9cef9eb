"""Models stage: the denoising network and the on-disk model format (diffusers layout + sdpipe.json)."""

from sdpipe.models.format import LoadedModel, ModelMeta, load_model, model_problem, save_model, weights_hash
from sdpipe.models.unet import build_unet

__all__ = ["LoadedModel", "ModelMeta", "build_unet", "load_model", "model_problem", "save_model", "weights_hash"]
