"""Every setting of the HTTP server, typed, with its default (request limits, batching, backpressure).

Set from the command line as `sdpipe serve --set max_batch=32 --set timeout_s=10`; anything unknown or out
of range stops the server before it starts, naming the key (the same `ConfigError` as the pipeline config).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdpipe.config import MAX_SEED, ConfigError, parse_override  # noqa: F401  (MAX_SEED: one bound everywhere)


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # request limits: a request outside them gets 422 naming the field
    max_n: int = Field(default=64, ge=1, le=4096)  # images per request
    max_steps: int = Field(default=100, ge=1, le=1000)  # sampler steps per request
    guidance_min: float = Field(default=0.0, ge=0, le=20)
    guidance_max: float = Field(default=20.0, ge=0, le=20)
    # Stable Diffusion models: image size (multiples of 8), prompt and input-image size
    max_width: int = Field(default=2048, ge=8, le=16384, multiple_of=8)  # pixels
    max_height: int = Field(default=2048, ge=8, le=16384, multiple_of=8)
    max_prompt_chars: int = Field(default=2000, ge=1, le=100_000)  # prompt and negative prompt, each
    max_image_mib: float = Field(default=16.0, gt=0, le=1024)  # an input image or mask, as sent (base64)
    # rows a Stable Diffusion model runs at once (None: the model's own, 1); part of an image's bits, as
    # `sdpipe generate --micro-batch`; above 1, concurrent requests share the network's batches
    sd_micro_batch: int | None = Field(default=None, ge=1, le=1024)
    # dynamic batching: requests queued within max_wait_ms of the first are run together, up to max_batch
    # images (a larger request still runs, alone); max_batch=1 serves one request at a time
    max_batch: int = Field(default=64, ge=1, le=65536)
    max_wait_ms: float = Field(default=50.0, ge=0, le=10_000)
    # backpressure: at most queue_size requests wait; beyond that 429 with Retry-After
    queue_size: int = Field(default=64, ge=1, le=100_000)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)  # a request not answered by then gets 503
    # torch intra-op threads for generation (None: torch's default, all cores); images do not depend on it
    # in our tests, but `sdpipe generate` is only guaranteed the same bits with the same thread count
    threads: int | None = Field(default=None, ge=1, le=1024)
    # model reference: re-resolved every poll_s seconds (and on POST /admin/reload); a new model is swapped in
    poll_s: float = Field(default=5.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _check_range(self) -> ServeSettings:
        if self.guidance_min > self.guidance_max:
            raise ValueError(f"guidance_min {self.guidance_min} is above guidance_max {self.guidance_max}")
        return self


def load_settings(overrides: list[str] | None = None) -> ServeSettings:
    """Defaults with `key=value` overrides, validated; `ConfigError` names any bad key."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        tree[key] = value
    try:
        return ServeSettings.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(settings)"
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = f"unknown setting; allowed: {', '.join(ServeSettings.model_fields)}"
            lines.append(f"  {key}: {msg}")
        raise ConfigError("invalid serve settings:\n" + "\n".join(lines)) from None
