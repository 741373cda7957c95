"""Typed settings of the pre-ranker stage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Objective = Literal["exposed", "unexposed_negative", "distill", "gpl", "hap", "gpl_hap"]
"""Training objectives; see :mod:`training.preranker.losses` and docs/preranker.md."""

OBJECTIVES: tuple[Objective, ...] = (
    "exposed",
    "unexposed_negative",
    "distill",
    "gpl",
    "hap",
    "gpl_hap",
)
#: Objectives that ``loss.popularity_debias`` applies to: those whose light model learns HAP's
#: contrastive groups, where the popularity bias comes from (docs/preranker.md). Never the
#: baselines, nor ``gpl`` alone: under its pointwise BCE the offset sits on the calibrated label
#: scale, the score learned anti-popularity and its AUC fell to 0.40 on MovieLens-100k.
DEBIASED_OBJECTIVES: tuple[Objective, ...] = ("hap", "gpl_hap")

HapGroup = Literal["exposed_negative", "rank_negative", "prerank_negative", "global_negative"]


class ModelSettings(BaseModel):
    """Shapes of the light and expressive networks."""

    model_config = ConfigDict(extra="forbid")

    tower_dim: int = Field(default=32, ge=4, description="Output width of each tower.")
    light_hidden: int = Field(
        default=48,
        ge=4,
        description="Hidden width of the light towers. 48 keeps the cascade (light on all, "
        "expressive on the top 20%) within 40% of the expressive model's FLOPs on every "
        "candidate (64: 42%); BENCHMARKS.md compares 32, 48 and 64.",
    )
    expressive_hidden: int = Field(
        default=192, ge=4, description="Hidden width of the expressive towers and scorer."
    )
    attention_dim: int = Field(
        default=32, ge=4, description="Key/query width of the expressive target attention."
    )
    category_vocab: int = Field(
        default=64, ge=1, description="Most frequent training categories embedded (others: 0)."
    )
    category_dim: int = Field(default=8, ge=1, description="Category embedding width.")
    history_length: int = Field(
        default=20, ge=1, description="Recent positives per user fed to the models."
    )
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout in hidden layers.")


class LossSettings(BaseModel):
    """Which objective, and its knobs."""

    model_config = ConfigDict(extra="forbid")

    objective: Objective = Field(default="gpl_hap", description="Training objective.")
    gpl_lambda: float = Field(
        default=1.0, ge=0, description="lambda of GPL fusion: weight of the pseudo-label term."
    )
    hap_temperature: float = Field(
        default=1.0, gt=0, description="Temperature tau of the HAP contrastive softmax."
    )
    hap_weighting: Literal["harmonized", "uniform"] = Field(
        default="harmonized",
        description="'harmonized': each group's weight is the inverse of its running mean "
        "gradient magnitude (groups contribute equal gradient mass); 'uniform': all 1.",
    )
    hap_momentum: float = Field(
        default=0.9, ge=0, lt=1, description="Momentum of the running gradient magnitudes."
    )
    hap_bce_weight: float = Field(
        default=1.0, ge=0, description="Weight of the exposed BCE kept beside the HAP terms."
    )
    distill_weight: float = Field(
        default=1.0, ge=0, description="Weight of the distillation term on unexposed rows."
    )
    popularity_debias: float = Field(
        default=0.75,
        ge=0,
        description="gamma of popularity-bias deconfounding (PD, Zhang et al., SIGIR 2021) for "
        "the light model under the hap and gpl_hap objectives: while training, its logits "
        "get + gamma x the candidate's standardized log-popularity (popularity_feature), so its "
        "own score need not learn popularity; scoring and serving use the plain score. 0.75 "
        "(of 0, 0.5, 0.75, 1 measured on MovieLens-100k) lifts long-tail recall above the "
        "exposed-only baseline at a small AUC cost (docs/preranker.md). 0: off.",
    )
    popularity_feature: str = Field(
        default="item_popularity__clicks",
        min_length=1,
        description="Item feature of the training join (`<view>__<feature>`) that "
        "popularity_debias reads, after the stage's standardization (counts are log1p'd first).",
    )


class TrainSettings(BaseModel):
    """Optimization settings."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=8, ge=1, description="Most epochs (early stopping may end sooner).")
    batch_requests: int = Field(
        default=8,
        ge=1,
        description="Requests per optimizer step (small batches: more steps; measured better).",
    )
    learning_rate: float = Field(default=2e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(default=1e-5, ge=0, description="AdamW weight decay.")
    validation_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=0.5,
        description="Latest share of training requests held out for early stopping.",
    )
    patience: int = Field(default=2, ge=1, description="Epochs without improvement to stop.")
    seed: int = Field(default=0, ge=0, description="Seed of initialization and batch order.")
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads (None: all). 1 makes training and `gpl evaluate` "
        "reproducible bit for bit: with several threads the matrix products' last bits vary "
        "from run to run, and over epochs that moves the figures (0.004 AUC on one objective of "
        "the demo's report between two runs).",
    )
    progress: bool = Field(default=True, description="Show a progress bar per epoch.")


class RoutingSettings(BaseModel):
    """Difficulty-aware routing: which candidates the expressive model re-scores."""

    model_config = ConfigDict(extra="forbid")

    hard_fraction: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="Share M of each request's candidates, the top by light score, re-scored by "
        "the expressive model.",
    )


def _hard_groups() -> list[HapGroup]:
    return ["exposed_negative", "rank_negative"]


class PrerankerConfig(BaseModel):
    """Every setting of the pre-ranker stage."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    loss: LossSettings = Field(default_factory=LossSettings)
    training: TrainSettings = Field(default_factory=TrainSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    expressive_groups: list[HapGroup] = Field(
        default_factory=_hard_groups,
        description="Hard groups the expressive model trains on (with the exposed positives).",
    )

    @model_validator(mode="after")
    def _groups_nonempty(self) -> PrerankerConfig:
        if not self.expressive_groups:
            raise ValueError("expressive_groups must name at least one group")
        return self
