"""RQ-VAE (Zeghidour et al., 2021; as used for Semantic IDs by TIGER, Rajput et al., 2023).

An MLP encoder maps a content vector to a ``code_dim`` latent; ``L`` residual codebooks of ``K``
codes quantize it (level ``l`` quantizes what levels ``< l`` left over); a mirrored MLP decoder
reconstructs the content vector from the sum of the chosen codewords. Training details:

* Codebooks start from (balanced) k-means on the encoder outputs of a sample of items (level by
  level on the residuals), so no code starts far from the data.
* Items are assigned to codes under an equal-size constraint while training (Sinkhorn-Knopp,
  as in LC-Rec's uniform semantic mapping), so no code absorbs a crowd; the frozen tokenizer maps
  to the nearest code.
* Gradients pass the non-differentiable nearest-code choice by the straight-through estimator.
* Loss: squared reconstruction error + per level ``|sg(r) - e|^2 + beta |r - sg(e)|^2``
  (codebook and commitment terms, VQ-VAE).
* Codes unused during an epoch are re-seeded onto residuals of randomly drawn items (dead-code
  re-seeding), which keeps utilization high and collisions low.
* Collision repulsion: at the start of each epoch, items whose nearest codes collide on every
  level are grouped; in each batch, a colliding item's latent is pushed away from the group
  mates it still collides with (mean kernel ``exp(-d2 / (width * mean d2))`` over those mates).
  Without it, the reconstruction loss lets near-duplicate items (product variants) share one code
  tuple; the push acts only on pairs that collide, so the clusters that make SIDs coherent are
  left alone.

Training runs on the CPU in float32 under its own RNG state: the model is small (4,385 items x
20 epochs take seconds). With one thread (``SidConfig.deterministic``, applied by the stage) the
SIDs are bit-for-bit reproducible from the seed; with several, run-to-run rounding differences
in the matrix products can flip near-tied codes (see :mod:`training.threads`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from tqdm.auto import tqdm

from training.sids.config import SidConfig
from training.sids.kmeans import Balance, balanced_labels, kmeans, nearest
from training.sids.tokenizer import (
    QuantizerSpec,
    SemanticIdTokenizer,
    build_mlp,
    residual_codes,
)


class RqVae(torch.nn.Module):
    """Encoder MLP -> residual codebooks -> decoder MLP."""

    def __init__(self, spec: QuantizerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = build_mlp(spec.encoder_dims())
        self.decoder = build_mlp(spec.encoder_dims()[::-1])
        self.codebooks = torch.nn.Parameter(
            torch.randn(spec.levels, spec.codebook_size, spec.code_dim) / spec.code_dim**0.5
        )

    def quantize(
        self, z: torch.Tensor, beta: float, balance: Balance | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual quantization with the straight-through estimator.

        Args:
            z: Encoder outputs.
            beta: Commitment loss weight.
            balance: Balanced (Sinkhorn) instead of nearest-code assignment, for training.

        Returns:
            The straight-through quantized latent, ``(n, L)`` codes and the summed codebook +
            commitment loss.
        """
        residual = z
        quantized = torch.zeros_like(z)
        codes = []
        latent_loss = z.new_zeros(())
        for level in range(self.spec.levels):
            book = self.codebooks[level]
            if balance is not None:
                idx = balanced_labels(
                    residual.detach(),
                    book.detach(),
                    iters=balance.iters,
                    temperature=balance.temperature,
                )
            else:
                idx, _ = nearest(residual.detach(), book.detach())
            word = book[idx]
            latent_loss = latent_loss + (
                (residual.detach() - word).pow(2).sum(-1).mean()
                + beta * (residual - word.detach()).pow(2).sum(-1).mean()
            )
            codes.append(idx)
            quantized = quantized + word
            residual = residual - word.detach()
        # Straight-through: forward uses the codewords, backward treats quantization as identity.
        z_q = z + (quantized - z).detach()
        return z_q, torch.stack(codes, 1), latent_loss

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output from the hard codewords (no straight-through), for evaluation."""
        z_q, _, _ = self.quantize(self.encoder(x), beta=0.0)
        return self.decoder(z_q)

    def tokenizer(self) -> SemanticIdTokenizer:
        """The frozen encoder + codebooks."""
        return SemanticIdTokenizer(
            self.spec, self.codebooks.detach().clone(), self.encoder.state_dict()
        )


@dataclass
class RqVaeFit:
    """A trained RQ-VAE and what training did.

    Attributes:
        tokenizer: The frozen quantizer.
        reconstruction: ``(N, D)`` decoder outputs for the training vectors.
        train_seconds: Wall time of initialization + training.
        losses: Mean loss per epoch.
        reseeded: Per level, how many dead codes were re-seeded over the whole training.
        colliding: Per epoch, the items whose nearest codes collided with another item's at
            the epoch's start (the ones the collision repulsion pushed), then after training.
    """

    tokenizer: SemanticIdTokenizer
    reconstruction: npt.NDArray[np.float32]
    train_seconds: float
    losses: list[float] = field(default_factory=list)
    reseeded: list[int] = field(default_factory=list)
    colliding: list[int] = field(default_factory=list)


def _init_codebooks(model: RqVae, x: torch.Tensor, cfg: SidConfig, gen: torch.Generator) -> None:
    """k-means on the encoder outputs of a sample, level by level on the residuals."""
    balance = Balance.from_config(cfg)
    n = x.shape[0]
    sample = x[torch.randperm(n, generator=gen)[: cfg.kmeans_samples]]
    with torch.no_grad():
        residual = model.encoder(sample)
        for level in range(cfg.levels):
            fit = kmeans(
                residual,
                cfg.codebook_size,
                iters=cfg.kmeans_iters,
                seed=cfg.seed + level,
                balance=balance,
            )
            model.codebooks.data[level] = fit.centroids
            labels, _ = nearest(residual, fit.centroids)
            residual = residual - fit.centroids[labels]


def _reseed_dead(
    model: RqVae, x: torch.Tensor, usage: torch.Tensor, gen: torch.Generator
) -> list[int]:
    """Move codes unused in the last epoch onto current residuals of random items."""
    counts = []
    with torch.no_grad():
        residual = model.encoder(x)
        for level in range(model.spec.levels):
            book = model.codebooks.data[level]
            dead = torch.nonzero(usage[level] == 0).flatten()
            if len(dead):
                picks = torch.randperm(x.shape[0], generator=gen)[: len(dead)]
                book[dead[: len(picks)]] = residual[picks]
            counts.append(len(dead))
            idx, _ = nearest(residual, book)
            residual = residual - book[idx]
    return counts


class CollisionGroups:
    """Items grouped by their nearest code tuple, keeping only groups of two or more."""

    def __init__(self, model: RqVae, x: torch.Tensor) -> None:
        with torch.no_grad():
            codes, _ = residual_codes(model.encoder(x), model.codebooks.detach())
        _, inverse, counts = np.unique(
            codes.numpy(), axis=0, return_inverse=True, return_counts=True
        )
        inverse = inverse.ravel()
        #: Per item, its group's index, or -1 when no other item has its codes.
        self.group = np.where(counts[inverse] > 1, inverse, -1)
        colliding = np.flatnonzero(self.group >= 0)
        order = colliding[np.argsort(self.group[colliding], kind="stable")]
        starts = np.flatnonzero(np.diff(self.group[order])) + 1
        self._members = {
            int(self.group[part[0]]): part for part in np.split(order, starts) if len(part)
        }
        self.items = len(colliding)

    def pairs(self, batch: npt.NDArray[np.int64]) -> tuple[np.ndarray, np.ndarray]:
        """(position in the batch, item index) of every batch item and each of its mates."""
        left, right = [], []
        for pos in np.flatnonzero(self.group[batch] >= 0):
            mates = self._members[int(self.group[batch[pos]])]
            mates = mates[mates != batch[pos]]
            left.append(np.full(len(mates), pos))
            right.append(mates)
        if not left:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(left), np.concatenate(right)


def _repulsion(
    model: RqVae,
    x: torch.Tensor,
    z: torch.Tensor,
    batch: torch.Tensor,
    groups: CollisionGroups,
    width: float,
) -> torch.Tensor:
    """Repulsion loss of a batch: for each colliding item, its mean kernel to its mates.

    The sum over the batch's colliding items is divided by the batch size, so the weight means
    the same at any batch size and share of collisions.

    Only the mates' latents are recomputed (with gradients), so a step costs a forward pass over
    the few colliding items, not over the catalog.
    """
    left, right = groups.pairs(batch.numpy())
    if not len(left):
        return z.new_zeros(())
    mates, where = np.unique(right, return_inverse=True)
    z_mates = model.encoder(x[torch.from_numpy(mates)])
    a_idx, b_idx = torch.from_numpy(left), torch.from_numpy(where.ravel())
    # Groups are found once per epoch; push only the pairs that still collide now, or a pair the
    # push has already separated keeps drifting apart (and the codebooks fall behind the latents).
    book = model.codebooks.detach()
    with torch.no_grad():
        codes_batch, _ = residual_codes(z.detach(), book)
        codes_mates, _ = residual_codes(z_mates.detach(), book)
    still = (codes_batch[a_idx] == codes_mates[b_idx]).all(-1)
    if not bool(still.any()):
        return z.new_zeros(())
    a_idx, b_idx = a_idx[still], b_idx[still]
    d2 = (z[a_idx] - z_mates[b_idx]).pow(2).sum(-1)
    # Relative to the batch's spread, so the kernel does not depend on the latent's scale.
    scale = torch.cdist(z.detach(), z.detach()).pow(2).mean().clamp_min(1e-12)
    kernel = torch.exp(-d2 / (width * scale))
    # Each colliding item counts once, whatever its group's size: a crowd of duplicates must not
    # outweigh the reconstruction of everything else.
    mates_per_item = torch.bincount(a_idx, minlength=len(batch)).to(kernel.dtype)
    return (kernel / mates_per_item[a_idx]).sum() / len(batch)


def train_rqvae(x_np: npt.NDArray[np.float32], cfg: SidConfig) -> RqVaeFit:
    """Train an RQ-VAE on content vectors.

    Args:
        x_np: ``(N, D)`` float32 content vectors (L2-normalized), ``N >= codebook_size``.
        cfg: Stage settings (``method`` is not looked at).

    Returns:
        The frozen tokenizer, the reconstructions and the training record.
    """
    began = time.perf_counter()
    x = torch.as_tensor(np.ascontiguousarray(x_np, dtype=np.float32))
    n = x.shape[0]
    spec = QuantizerSpec(
        method="rqvae",
        input_dim=int(x.shape[1]),
        levels=cfg.levels,
        codebook_size=cfg.codebook_size,
        code_dim=cfg.code_dim,
        hidden_dims=cfg.hidden_dims,
    )
    # A private RNG state: the result depends on the seed only, and callers' RNGs are untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = RqVae(spec)
        _init_codebooks(model, x, cfg, gen)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        balance = Balance.from_config(cfg)
        losses: list[float] = []
        reseeded = [0] * cfg.levels
        colliding: list[int] = []
        bar = tqdm(
            range(cfg.epochs), desc="training RQ-VAE", unit="epoch", disable=not cfg.show_progress
        )
        for epoch in bar:
            model.train()
            usage = torch.zeros(cfg.levels, cfg.codebook_size, dtype=torch.long)
            total, steps = 0.0, 0
            groups = CollisionGroups(model, x) if cfg.collision_repulsion > 0 else None
            if groups is not None:
                colliding.append(groups.items)
            for batch in torch.randperm(n, generator=gen).split(cfg.batch_size):
                xb = x[batch]
                z = model.encoder(xb)
                z_q, codes, latent_loss = model.quantize(z, cfg.beta, balance)
                loss = (model.decoder(z_q) - xb).pow(2).sum(-1).mean() + latent_loss
                if groups is not None and groups.items:
                    loss = loss + cfg.collision_repulsion * _repulsion(
                        model, x, z, batch, groups, cfg.collision_repulsion_width
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for level in range(cfg.levels):
                    usage[level] += torch.bincount(codes[:, level], minlength=cfg.codebook_size)
                total += loss.detach().item()
                steps += 1
            losses.append(total / max(steps, 1))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if cfg.reseed_dead_codes and epoch < cfg.epochs - 1:
                model.eval()
                for level, count in enumerate(_reseed_dead(model, x, usage, gen)):
                    reseeded[level] += count
        model.eval()
        if cfg.collision_repulsion > 0:
            colliding.append(CollisionGroups(model, x).items)
        reconstruction = model.reconstruct(x).numpy()
        tokenizer = model.tokenizer()
    return RqVaeFit(
        tokenizer=tokenizer,
        reconstruction=reconstruction.astype(np.float32),
        train_seconds=time.perf_counter() - began,
        losses=losses,
        reseeded=reseeded,
        colliding=colliding,
    )
