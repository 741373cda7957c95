"""Settings of the Semantic ID stage: the quantizer, its training and the content encoder."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.sids.collaborative import CollaborativeConfig
from training.sids.encoder import EncoderConfig
from training.sids.ids import MAX_LEVELS


class SidConfig(BaseModel):
    """Every setting of ``train_sids``; ``docs/semantic_ids.md`` explains the defaults."""

    # No inf or NaN in any number: an infinite learning rate or weight trains to NaN silently.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: Literal["rqvae", "rkmeans"] = Field(
        default="rqvae",
        description="rqvae: a trained residual-quantized autoencoder (RQ-VAE); rkmeans: residual "
        "k-means on the content vectors, no training (fast, a strong baseline).",
    )
    levels: int = Field(
        default=3,
        ge=1,
        le=MAX_LEVELS - 1,
        description="Residual codebooks; a SID has this many codes plus a disambiguation code.",
    )
    codebook_size: int = Field(default=256, ge=2, description="Codes per codebook (K).")
    code_dim: int = Field(
        default=32,
        ge=1,
        description="Width of the RQ-VAE latent and its codewords (rkmeans quantizes the content "
        "vector itself and ignores this).",
    )
    hidden_dims: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        default=(256, 128),
        description="Hidden layer widths of the RQ-VAE encoder MLP; the decoder mirrors them.",
    )
    epochs: int = Field(
        default=20,
        ge=1,
        description="RQ-VAE passes over the items. More epochs improve reconstruction but let the "
        "encoder merge near-duplicate items, raising collisions (see docs/semantic_ids.md).",
    )
    batch_size: int = Field(default=256, ge=1, description="Items per RQ-VAE optimizer step.")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate of the RQ-VAE.")
    beta: float = Field(
        default=0.25,
        ge=0,
        description="Commitment loss weight: pulls encoder outputs towards their codewords "
        "(VQ-VAE, van den Oord et al., 2017).",
    )
    balanced_assignment: bool = Field(
        default=True,
        description="While fitting (RQ-VAE batches, k-means iterations), assign items to codes "
        "under an equal-size constraint (Sinkhorn-Knopp), so every code is used and no code "
        "absorbs a crowd; the frozen tokenizer still maps each vector to its nearest code.",
    )
    sinkhorn_iters: int = Field(
        default=20, ge=1, description="Sinkhorn-Knopp iterations of each balanced assignment."
    )
    sinkhorn_temperature: float = Field(
        default=0.05,
        gt=0,
        description="Entropy of the balanced assignment relative to the mean squared distance "
        "(smaller: harder and more exactly balanced, slower to converge).",
    )
    unique_last_level: bool = Field(
        default=True,
        description="Give items that share their first levels - 1 codes distinct last-level "
        "codes (least-total-distance matching of the group onto the free codes), so "
        "near-duplicate items differ at the last level instead of only in the disambiguation "
        "code. Ignored when levels is 1.",
    )
    collision_repulsion: float = Field(
        default=40.0,
        ge=0,
        description="Weight of the RQ-VAE collision-repulsion loss: items whose nearest codes "
        "collide (same code on every level, found once per epoch) push their latents apart, so "
        "near-duplicate items end with distinct SIDs before any disambiguation. 0 turns it off "
        "(see docs/semantic_ids.md for the trade-off against reconstruction and coherence).",
    )
    collision_repulsion_width: float = Field(
        default=0.5,
        gt=0,
        description="Width of the repulsion kernel exp(-d2 / (width * mean d2)), relative to the "
        "batch's mean squared latent distance d2: colliding pairs are far closer than the mean, "
        "so the push is near its full strength until they separate.",
    )
    reseed_dead_codes: bool = Field(
        default=True,
        description="After each RQ-VAE epoch but the last, move codes no item used during the "
        "epoch onto current residuals, so codebooks stay fully used.",
    )
    kmeans_iters: int = Field(
        default=50,
        ge=1,
        description="Most Lloyd iterations per k-means (rkmeans levels, RQ-VAE codebook init).",
    )
    kmeans_samples: int = Field(
        default=16_384,
        ge=1,
        description="Items sampled to fit k-means (the rkmeans levels, the RQ-VAE codebook "
        "initialization); all items when there are fewer. Bounds time and memory (a balanced "
        "assignment holds samples x codebook_size floats).",
    )
    seed: int = Field(
        default=0, ge=0, description="Seed of every random choice; same seed, same SIDs."
    )
    deterministic: bool = Field(
        default=True,
        description="Fit the quantizer on one CPU thread, so that the same seed gives the same "
        "SIDs bit for bit in every run. Multi-threaded matrix products differ in their last bits "
        "from run to run, which flips near-ties between codes and, through dead-code re-seeding, "
        "changes most SIDs. false: every core (15-35% faster on 2 cores, measured).",
    )
    show_progress: bool = Field(default=True, description="Show progress bars on the terminal.")
    encoder: EncoderConfig = Field(
        default_factory=EncoderConfig, description="The frozen content encoder."
    )
    collaborative: CollaborativeConfig = Field(
        default_factory=CollaborativeConfig,
        description="A collaborative block fused into the item space, built from the "
        "interaction log (off by default; see docs/semantic_ids.md).",
    )

    @model_validator(mode="after")
    def _enough_samples(self) -> SidConfig:
        if self.kmeans_samples < self.codebook_size:
            raise ValueError(
                f"kmeans_samples ({self.kmeans_samples}) must be >= codebook_size "
                f"({self.codebook_size}): k-means needs a sample per code"
            )
        return self
