"""The settings of a table diffusion model (issue 18, item 3): the denoiser's shape and the two diffusions.
See docs/table-models.md."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TableModelConfig(BaseModel):
    """A TabDDPM-style model for a mixed-type table (Kotelnikov et al. 2023): an MLP denoiser, Gaussian
    diffusion for the numbers, and for the categories either

    * ``"masked"``: absorbing-state diffusion (Austin et al. 2021, D3PM; Sahoo et al. 2024, MDLM): a cell is
      replaced by a MASK index with probability 1 - alpha_bar_t (the share of the numbers' signal that is
      gone at t), the network predicts the original category, and sampling unmasks progressively; or
    * ``"onehot"``: each category as a one-hot vector scaled to +-1 inside the Gaussian block, decoded by
      argmax (the "analog bits" family, Chen et al. 2022).

    The default was chosen by measurement (bench/table_categorical.py on palmerpenguins, 3 seeds each; see
    docs/table-models.md for the figures): ``masked``. It matched or beat ``onehot`` on category fidelity
    and pairwise association at the same training cost, and it conditions on known categories exactly
    (an observed category is an input, not a noised vector).
    """

    model_config = ConfigDict(extra="forbid")

    categorical: Literal["masked", "onehot"] = "masked"
    width: int = Field(default=256, ge=8)  # hidden width of every MLP layer
    depth: int = Field(default=3, ge=1)  # hidden layers after the input projection
    time_embedding: int = Field(default=128, ge=8)  # sinusoidal timestep features (even)
    category_embedding: int = Field(default=16, ge=1)  # per-column embedding width of a category (masked)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    train_steps: int = Field(default=1000, ge=2)  # diffusion timesteps T of the forward process
    sample_steps: int = Field(default=50, ge=1)  # denoising steps at generation (<= train_steps)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "sample"] = "epsilon"  # what the network predicts for the numbers
