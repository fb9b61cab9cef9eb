"""CLIP score and CLIP image features from a local transformers CLIP folder, offline.

The CLIP score of an image and its prompt is 100 * cos(E_I, E_T), E_I and E_T the CLIP model's projected image
and text embeddings (Hessel et al. 2021, "CLIPScore"; the definition torchmetrics' `CLIPScore` uses): images go
through the folder's own `CLIPProcessor` (resize, centre crop, normalize) from the PNG pixels, prompts through its
tokenizer, truncated to the text encoder's window (77 tokens for OpenAI's CLIP) as torchmetrics truncates them.

Why not torchmetrics' `CLIPScore` itself (torchmetrics 1.9.0 and transformers 5.x, as installed):

- `model_name_or_path=<local folder>` is refused unless the path contains "openai", "jinaai" or "zer0int", and
  then it calls `from_pretrained` without `local_files_only`, so it may reach for the Hub;
- the other way in, a callable returning (model, processor), fails: transformers 5's `get_image_features` and
  `get_text_features` return a `BaseModelOutputWithPooling`, not a tensor, and torchmetrics calls `.norm` on it
  (`AttributeError`; Lightning-AI/torchmetrics issue #3407).

So the score is computed here with the same preprocessing and formula (`tests/test_evaluate_t2i.py` checks it
against torchmetrics' own update function on an adapted model). One difference: torchmetrics clamps the *mean* at
0. sdpipe does not, because a mean below 0 never happens for matched pairs with a real CLIP model (they score
about 20-35), the clamp would flatten differences between random test models, and a clamped mean has no
interval.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
BATCH = 32


def _tensor(out: Any) -> torch.Tensor:
    """transformers 4 returns the projected embeddings as a tensor; transformers 5 as `pooler_output`."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class ClipModel:
    """A CLIP model and its processor, loaded from a local folder, with the folder's content hash."""

    path: Path
    model: Any  # transformers CLIPModel, eval mode
    processor: Any  # transformers CLIPProcessor
    hash: str
    max_tokens: int
    _text: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    truncated: list[str] = field(default_factory=list)  # prompts past the text window, cut as CLIP cuts them

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def name(self) -> str:
        return f"{self.path.name} (sha256:{self.hash[:16]})"

    @torch.inference_mode()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Unit-length text embeddings (P, D), each prompt encoded alone, cached."""
        tokenizer = self.processor.tokenizer
        for p in prompts:
            if p in self._text:
                continue
            if len(tokenizer(p).input_ids) > self.max_tokens and p not in self.truncated:
                self.truncated.append(p)
            tokens = tokenizer([p], padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
            ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            e = _tensor(self.model.get_text_features(ids, mask))[0].float().cpu()
            self._text[p] = e / e.norm()
        return torch.stack([self._text[p] for p in prompts])

    @torch.inference_mode()
    def image_embeddings(self, images: Any) -> torch.Tensor:
        """Unit-length image embeddings (N, D) of uint8 RGB images (each (H, W, 3); sizes may differ)."""
        out = []
        for i in range(0, len(images), BATCH):
            pil = [Image.fromarray(np.asarray(a, dtype=np.uint8)).convert("RGB") for a in images[i : i + BATCH]]
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            e = _tensor(self.model.get_image_features(pixel_values=pixels)).float().cpu()
            out.append(e / e.norm(dim=-1, keepdim=True))
        return torch.cat(out)

    def scores(self, images: Any, prompts: list[str]) -> np.ndarray:
        """100 * cos(image i, prompt j) for every image and prompt: an (N, P) array."""
        sim = self.image_embeddings(images) @ self.text_embeddings(prompts).T
        return (100.0 * sim).double().numpy()

    def pair_scores(self, images: Any, prompts: list[str]) -> np.ndarray:
        """The CLIP score of each image with its own prompt (images[i] with prompts[i])."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        distinct = list(dict.fromkeys(prompts))
        s = self.scores(images, distinct)
        return s[np.arange(len(prompts)), [distinct.index(p) for p in prompts]]


def _image_processor_class() -> Any:
    """CLIP's PIL-based image processor, whatever else is installed: transformers 5 names it
    `CLIPImageProcessorPil` (its `CLIPImageProcessor` needs torchvision and resizes with torch, which gives other
    pixels); in transformers 4 `CLIPImageProcessor` is the PIL one."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> ClipModel:
    """The CLIP model in a local folder saved by transformers (`CLIPModel` + `CLIPProcessor`: config.json,
    model.safetensors, the processor and tokenizer files), offline, in float32 on `device`. Raises
    FileNotFoundError or ValueError naming the folder and what is missing."""
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    from sdpipe.models.hashes import component_sha256

    path = Path(path)
    what = f"--clip {path}"
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what}: no such folder (give a local CLIP model folder, e.g. a copy of openai/clip-vit-large-patch14 "
            "with its processor files)"
        )
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{what}: not a CLIP model folder: it has no config.json")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{what}: config.json is not a JSON object ({exc})") from None
    if model_type != "clip":
        found = model_type or "model of no model_type"
        raise ValueError(f"{what}: config.json describes a {found}, not a CLIP model (model_type 'clip')")
    if not any((path / w).is_file() for w in WEIGHTS):
        pickled = [p for p in PICKLES if (path / p).is_file()]
        why = (
            f"only {pickled[0]}, a pickle, which sdpipe never unpickles: convert it to model.safetensors "
            "(CLIPModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True))"
            if pickled
            else "no model.safetensors"
        )
        raise ValueError(f"{what}: {why}")
    if not any((path / p).is_file() for p in PROCESSOR_FILES):
        raise ValueError(
            f"{what}: no image processor config ({' or '.join(PROCESSOR_FILES)}); save the model's CLIPProcessor "
            "into the folder too"
        )
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
        processor = CLIPProcessor(
            image_processor=_image_processor_class().from_pretrained(path, local_files_only=True),
            tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True),
        )
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{what}: not a CLIP model transformers can load offline ({exc})") from None
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{what}: its processor lacks a tokenizer or an image processor")
    model.to(torch.device(device))
    max_tokens = int(model.config.text_config.max_position_embeddings)
    return ClipModel(path, model, processor, component_sha256(path), max_tokens)


class ClipFeatures:
    """CLIP image embeddings as a feature space for FID and KID ("FD in CLIP space", as Kynkaanniemi et al. 2023
    recommend, "The Role of ImageNet Classes in Frechet Inception Distance"): unit-length embeddings times
    sqrt(D), so each coordinate has RMS about 1, the scale KID's cubic kernel is made for. Not Inception FID."""

    def __init__(self, clip: ClipModel) -> None:
        self.clip = clip
        self.name = f"clip-image-embeds:sha256:{clip.hash[:16]}"
        dim = int(clip.model.config.projection_dim)
        self.scale = math.sqrt(dim)
        self.description = (
            f"CLIP image embeddings ({dim}-d, unit length x sqrt({dim})) of {clip.path.name} (folder sha256 "
            f"{clip.hash[:12]}...), images through its own processor: Frechet distance in CLIP space, NOT Inception "
            "FID; comparable only with numbers of the same feature name."
        )

    def features(self, pixels: Any) -> np.ndarray:
        return (self.clip.image_embeddings(pixels) * self.scale).double().numpy()
