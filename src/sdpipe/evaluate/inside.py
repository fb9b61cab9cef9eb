"""Looking inside the sampler: the denoising trajectory of a few samples, and the UNet's attention maps.

- Trajectory: the model's clean-image prediction (x0) after every sampler step, through `generate`'s
  `on_step` callback; the samples are exactly the ones `sdpipe generate` makes for the same seeds.
- Attention: a diffusers attention processor (`AttnProcessor`, the reference implementation) that keeps the
  attention probabilities of every call; for each attention layer we report the attention each position
  *receives* (mean over queries and heads) at the middle sampler step, as a map over the layer's grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor

from sdpipe.models import LoadedModel
from sdpipe.sampling import SampleSpec, generate
from sdpipe.sampling.files import to_pixels


def _generate(model: LoadedModel, spec: SampleSpec, seeds: list[int], labels: list[int] | None, **kw: Any) -> Any:
    meta = model.meta
    shape = (meta.channels, meta.image_size, meta.image_size)
    return generate(
        model.unet, model.scheduler_config, seeds, labels, shape=shape, null_label=meta.null_label, spec=spec, **kw
    )


def trajectory(
    model: LoadedModel, spec: SampleSpec, seeds: list[int], labels: list[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """x0 predictions as uint8 pixels (n_seeds, n_steps, H, W[, C]) and the final images (n_seeds, H, W[, C])."""
    steps: dict[int, dict[int, torch.Tensor]] = {}  # step index -> seed -> x0 (micro-batches come in turn)
    final = _generate(model, spec, seeds, labels, on_step=lambda i, x0: steps.setdefault(i, {}).update(x0))
    vr = model.meta.value_range
    per_step = [to_pixels(torch.stack([steps[i][s] for s in seeds]), vr) for i in sorted(steps)]
    return np.stack(per_step, axis=1), to_pixels(final, vr)


class RecordingAttnProcessor(AttnProcessor):
    """diffusers' reference attention, unchanged, that also keeps each call's attention probabilities
    ((batch * heads, queries, keys)) in `self.calls`."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(  # the named parameters tell diffusers which keyword arguments this processor takes
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        scores = attn.get_attention_scores

        def keep(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            probs = scores(query, key, mask)
            self.calls.append(probs.detach().float().cpu())
            return probs

        attn.get_attention_scores = keep  # type: ignore[method-assign,assignment]  # this call only
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            del attn.get_attention_scores  # back to the class's method


def attention_maps(
    model: LoadedModel, spec: SampleSpec, seeds: list[int], labels: list[int] | None
) -> dict[str, np.ndarray]:
    """Per attention layer: (n_seeds, h, w) attention received by each grid position at the middle step
    (mean over queries and heads; the conditional half under guidance). Empty for a model without attention.
    The recorded samples may differ from `generate`'s in the last bits (reference attention kernel)."""
    layers = {name: m for name, m in model.unet.named_modules() if isinstance(m, Attention)}
    if not layers:
        return {}
    original = {name: layer.processor for name, layer in layers.items()}
    recorders = {name: RecordingAttnProcessor() for name in layers}
    try:
        for name, layer in layers.items():
            layer.set_processor(recorders[name])
        _generate(model, spec, seeds, labels)
    finally:
        for name, layer in layers.items():
            layer.set_processor(original[name])
    maps = {}
    for name, rec in recorders.items():
        per_seed = []
        for s in seeds:
            # calls come micro-batch by micro-batch, the same number for each
            calls = rec.calls[_call_index(seeds, s, spec.micro_batch, len(rec.calls))]
            probs = calls.reshape(-1, layers[name].heads, *calls.shape[1:])[s % spec.micro_batch]
            received = probs.mean(dim=(0, 1))  # over heads and queries
            side = int(round(received.numel() ** 0.5))
            per_seed.append(received.reshape(side, side).numpy())
        maps[name] = np.stack(per_seed)
    return maps


def _call_index(seeds: list[int], seed: int, micro_batch: int, n_calls: int) -> int:
    """Index of the middle-step call of the micro-batch that holds `seed`."""
    groups = sorted({s // micro_batch for s in seeds})
    per_group = n_calls // len(groups)
    return groups.index(seed // micro_batch) * per_group + per_group // 2
