"""Residual k-means: Semantic IDs without training, as a fast alternative to the RQ-VAE.

Level 1 is a k-means of the content vectors; level ``l`` is a k-means of what the levels before
it left over (each vector minus its nearest centroids). It is the RQ-VAE's quantizer without the
learned encoder and decoder: seconds instead of minutes, and a strong baseline in the SID
literature. With ``SidConfig.balanced_assignment`` each k-means assigns under an equal-size
constraint while fitting, which keeps any centroid from absorbing a crowd of residuals. The
reconstruction of an item is the sum of its centroids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from tqdm.auto import tqdm

from training.sids.config import SidConfig
from training.sids.kmeans import Balance, kmeans, nearest
from training.sids.tokenizer import QuantizerSpec, SemanticIdTokenizer, residual_codes


@dataclass
class RkMeansFit:
    """Fitted residual k-means.

    Attributes:
        tokenizer: The frozen quantizer (centroids of every level).
        reconstruction: ``(N, D)`` sum of each item's centroids.
        train_seconds: Wall time of the fit.
        inertia: Per level, the sum of squared residual norms of the fitting sample left after
            that level.
    """

    tokenizer: SemanticIdTokenizer
    reconstruction: npt.NDArray[np.float32]
    train_seconds: float
    inertia: list[float]


def fit_rkmeans(x_np: npt.NDArray[np.float32], cfg: SidConfig) -> RkMeansFit:
    """Fit ``cfg.levels`` levels of ``cfg.codebook_size``-means on residuals.

    Args:
        x_np: ``(N, D)`` float32 content vectors, ``N >= codebook_size``.
        cfg: Stage settings (``levels``, ``codebook_size``, ``kmeans_iters``, ``kmeans_samples``,
            the balance settings, ``seed``).

    Returns:
        The frozen tokenizer, the reconstructions and per-level inertia.
    """
    began = time.perf_counter()
    x = torch.as_tensor(np.ascontiguousarray(x_np, dtype=np.float32))
    generator = torch.Generator().manual_seed(cfg.seed)
    residual = x[torch.randperm(x.shape[0], generator=generator)[: cfg.kmeans_samples]]
    balance = Balance.from_config(cfg)
    centroids, inertia = [], []
    for level in tqdm(
        range(cfg.levels), desc="residual k-means", unit="level", disable=not cfg.show_progress
    ):
        fit = kmeans(
            residual,
            cfg.codebook_size,
            iters=cfg.kmeans_iters,
            seed=cfg.seed + level,
            balance=balance,
        )
        centroids.append(fit.centroids)
        # The tokenizer maps to the nearest centroid: the next level fits what that leaves.
        labels, dists = nearest(residual, fit.centroids)
        residual = residual - fit.centroids[labels]
        inertia.append(float(dists.sum()))
    spec = QuantizerSpec(
        method="rkmeans",
        input_dim=int(x.shape[1]),
        levels=cfg.levels,
        codebook_size=cfg.codebook_size,
        code_dim=int(x.shape[1]),
    )
    codebooks = torch.stack(centroids)
    _, words = residual_codes(x, codebooks)
    return RkMeansFit(
        tokenizer=SemanticIdTokenizer(spec, codebooks),
        reconstruction=words.sum(1).numpy().astype(np.float32),
        train_seconds=time.perf_counter() - began,
        inertia=inertia,
    )
