"""Training the text encoder(s) beside the UNet (`train.train_text_encoder`).

When the text encoders train, their outputs cannot be cached: each step tokenizes its captions (the token ids
are computed once per caption) and `TextAndUNet` runs the encoders and then the UNet, so the optimizer, the
EMA and the checkpoints see one module holding both. `encode` computes the prompt embeddings exactly as
diffusers' `encode_prompt` does (SD: the last hidden state; SDXL: both encoders' penultimate hidden states side
by side and the second one's pooled projection), so a saved model samples with the embeddings it trained on.

How an encoder trains follows `train.method`: a peft LoRA on its attention projections for `lora` (written
into RUN/lora.safetensors under kohya's `lora_te_` / `lora_te1_` / `lora_te2_` keys), every weight for
`full` and `scratch` (saved in the pipeline folder).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sdpipe.train.losses import TextCond, TokenCond

ENCODERS = ("text_encoder", "text_encoder_2")  # the pipeline attributes, in the order the ids come


class TextAndUNet(nn.Module):
    """A UNet with the text encoder(s) it is conditioned on: `forward(x, t, TokenCond)` is the noise
    prediction. `encoders` are in the pipeline's order (SDXL: `text_encoder`, then `text_encoder_2`)."""

    def __init__(self, unet: nn.Module, encoders: list[nn.Module]) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoders = nn.ModuleList(encoders)

    def encode(self, cond: TokenCond) -> TextCond:
        """The prompt embeddings (and SDXL's added inputs) of the token ids, as diffusers' pipelines compute
        them with `clip_skip=None`."""
        if len(self.text_encoders) == 1:
            encoder = self.text_encoders[0]
            ids = cond.ids[0]
            mask = None
            if getattr(encoder.config, "use_attention_mask", False):
                mask = torch.ones_like(ids)  # the tokenizer pads to the window: what encode_prompt passes
            return TextCond(encoder(ids, attention_mask=mask)[0])
        hidden, pooled = [], None
        for encoder, ids in zip(self.text_encoders, cond.ids, strict=True):
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # the projection model's pooled output: SDXL keeps the last encoder's
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None or cond.time_ids is None:
            raise ValueError("an SDXL text condition needs the pooled projection and time_ids")
        return TextCond(torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": cond.time_ids})

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TokenCond) -> torch.Tensor:
        c = self.encode(cond)
        return self.unet(x, t, encoder_hidden_states=c.embeds, added_cond_kwargs=c.added).sample

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()  # type: ignore[operator]
        for encoder in self.text_encoders:
            encoder.gradient_checkpointing_enable()  # type: ignore[operator]


class Tokens:
    """Each caption's token ids under the pipeline's tokenizer(s), padded to the window and cut as diffusers'
    `encode_prompt` cuts them; computed once per caption."""

    def __init__(self, pipe: Any) -> None:
        self.tokenizers = [t for n in ("tokenizer", "tokenizer_2") if (t := getattr(pipe, n, None)) is not None]
        self._ids: dict[str, tuple[torch.Tensor, ...]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        missing = sorted({c for c in captions if c not in self._ids})
        if missing:
            per_tokenizer = [
                tok(
                    missing, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
                ).input_ids
                for tok in self.tokenizers
            ]
            for k, caption in enumerate(missing):
                self._ids[caption] = tuple(ids[k] for ids in per_tokenizer)
        return tuple(torch.stack([self._ids[c][j] for c in captions]) for j in range(len(self.tokenizers)))


def text_encoders(pipe: Any) -> list[nn.Module]:
    """The pipeline's text encoders, in `ENCODERS` order."""
    return [m for n in ENCODERS if (m := getattr(pipe, n, None)) is not None]


def prepare_text_encoders(encoders: list[nn.Module], lora: Any | None) -> None:
    """Make the encoders trainable: a peft LoRA of `lora` (a `LoraConfig`) on each, the rest frozen, or (None)
    every weight. transformers' own `add_adapter` needs a newer peft than PyPI has, so the adapter is injected
    with peft's `inject_adapter_in_model`, which is what `add_adapter` calls."""
    for encoder in encoders:
        if lora is None:
            encoder.requires_grad_(True)
        else:
            from peft import inject_adapter_in_model

            encoder.requires_grad_(False)
            inject_adapter_in_model(lora, encoder)
        encoder.train()


def text_lora_state_dict(encoders: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The encoders' LoRA in peft keys prefixed by the pipeline attribute (`text_encoder.…`), ready for
    diffusers' kohya conversion (then `kohya_text_prefix`)."""
    from peft.utils import get_peft_model_state_dict

    out: dict[str, torch.Tensor] = {}
    for name, encoder in zip(ENCODERS, encoders, strict=False):
        for k, v in get_peft_model_state_dict(encoder).items():
            # transformers 5 keeps CLIP's layers at the top (`encoder.layers…`); kohya's files, the web UIs and
            # diffusers' loader name them under `text_model.` (diffusers drops it again where the model lacks it)
            key = k if k.startswith("text_model.") else f"text_model.{k}"
            out[f"{name}.{key}"] = v.detach().cpu().contiguous()
    return out


def kohya_text_prefix(key: str, xl: bool) -> str:
    """diffusers names the first encoder `lora_te1_` (SDXL's convention); SD 1/2 files use `lora_te_`, which
    is what the web UIs look for in a non-SDXL LoRA."""
    return key if xl or not key.startswith("lora_te1_") else "lora_te_" + key[len("lora_te1_") :]
