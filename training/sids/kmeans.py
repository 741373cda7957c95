"""Seeded k-means with k-means++ seeding, in torch.

Used twice: residual k-means fits one k-means per level, and the RQ-VAE initializes each codebook
with k-means on encoder outputs. A cluster that runs empty during Lloyd iterations is re-seeded
with the point farthest from its centroid, so every centroid ends up owning at least one point
whenever there are at least ``k`` distinct points: that keeps codebook utilization high.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from training.sids.config import SidConfig

_CHUNK_ROWS = 16_384
"""Rows per block when computing point-centroid distances: bounds memory to rows x k floats."""


@dataclass
class KMeansResult:
    """A fitted k-means.

    Attributes:
        centroids: ``(k, d)`` cluster centres.
        labels: ``(n,)`` index of each point's centroid.
        inertia: Sum of squared distances of points to their centroids.
        iterations: Lloyd iterations run.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    iterations: int


@dataclass(frozen=True)
class Balance:
    """Settings of the balanced (Sinkhorn-Knopp) code assignment used while fitting."""

    iters: int
    temperature: float

    @classmethod
    def from_config(cls, cfg: SidConfig) -> Balance | None:
        """The balance settings of ``cfg``, or None when it asks for plain nearest codes."""
        if not cfg.balanced_assignment:
            return None
        return cls(cfg.sinkhorn_iters, cfg.sinkhorn_temperature)


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(n, k)`` squared Euclidean distances, clamped at 0 against rounding."""
    dist = (
        x.pow(2).sum(1, keepdim=True) - 2.0 * x @ centroids.T + centroids.pow(2).sum(1).unsqueeze(0)
    )
    return dist.clamp_min_(0.0)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid of every row and the squared distance to it."""
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        block = squared_distances(x[start : start + _CHUNK_ROWS], centroids)
        d, i = block.min(1)
        labels[start : start + _CHUNK_ROWS] = i
        dists[start : start + _CHUNK_ROWS] = d
    return labels, dists


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``k`` rows of ``x`` as initial centres.

    Each next centre is drawn with probability proportional to the squared distance to the
    nearest centre chosen so far; once every distinct point is a centre, the rest are uniform.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = torch.randint(n, (1,), generator=generator).item()
    closest = squared_distances(x, x[chosen[:1]]).squeeze(1)
    for j in range(1, k):
        total = closest.sum()
        # All remaining points coincide with chosen centres: fall back to uniform draws.
        probs = (closest / total).cpu() if total.item() > 0 else torch.ones(n)
        chosen[j] = torch.multinomial(probs, 1, generator=generator).item()
        closest = torch.minimum(closest, squared_distances(x, x[chosen[j : j + 1]]).squeeze(1))
    return x[chosen.to(x.device)].clone()


def balanced_labels(
    x: torch.Tensor, centroids: torch.Tensor, *, iters: int, temperature: float
) -> torch.Tensor:
    """Cluster labels under a (soft) equal-size constraint, by Sinkhorn-Knopp.

    Entropic optimal transport of the points onto ``k`` clusters of equal mass ends in a
    nearest-centroid rule with one additive offset per centroid; the offsets make over-full
    clusters more expensive. ``temperature`` scales the entropy relative to the mean squared
    distance (smaller: closer to a hard balanced assignment, slower to converge).
    """
    n, k = x.shape[0], centroids.shape[0]
    d2 = squared_distances(x, centroids)
    eps = temperature * float(d2.mean().clamp_min(1e-12))
    log_kernel = -d2 / eps
    u = torch.zeros(n, dtype=x.dtype)
    v = torch.zeros(k, dtype=x.dtype)
    log_col_mass = torch.log(torch.tensor(n / k, dtype=x.dtype))
    for _ in range(iters):
        u = -torch.logsumexp(log_kernel + v.unsqueeze(0), dim=1)
        v = log_col_mass - torch.logsumexp(log_kernel + u.unsqueeze(1), dim=0)
    return (log_kernel + v.unsqueeze(0)).argmax(1)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int,
    seed: int,
    tol: float = 1e-6,
    balance: Balance | None = None,
) -> KMeansResult:
    """Lloyd's k-means from a k-means++ start.

    Args:
        x: ``(n, d)`` points.
        k: Number of clusters.
        iters: Most Lloyd iterations.
        seed: Seed of the k-means++ draws; the result is a function of ``(x, k, iters, seed)``.
        tol: Stop once the inertia improves by less than this fraction.
        balance: Assign points to clusters under an equal-size constraint in every iteration
            (the returned ``labels`` and ``inertia`` are still nearest-centroid ones).

    Returns:
        The fitted centroids, labels and inertia.
    """
    generator = torch.Generator().manual_seed(seed)
    centroids = kmeans_plus_plus(x, k, generator)
    labels, dists = nearest(x, centroids)
    inertia = float(dists.sum())
    done = 0
    for done in range(1, iters + 1):  # noqa: B007 - ``done`` is reported after the loop
        if balance is not None:
            labels = balanced_labels(
                x, centroids, iters=balance.iters, temperature=balance.temperature
            )
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        empty = counts == 0
        centroids = torch.where(
            empty.unsqueeze(1), centroids, sums / counts.clamp_min(1).unsqueeze(1)
        )
        if bool(empty.any()):
            # Move each empty centre onto one of the worst-served points (deterministic order).
            worst = torch.argsort(dists, descending=True, stable=True)[: int(empty.sum())]
            centroids[empty] = x[worst]
        labels, dists = nearest(x, centroids)
        new_inertia = float(dists.sum())
        improved = inertia - new_inertia
        inertia = new_inertia
        # Balanced iterations do not descend the nearest-centroid inertia: run them all.
        converged = 0 <= improved <= tol * max(inertia, 1e-12)
        if converged and balance is None and not bool(empty.any()):
            break
    return KMeansResult(centroids=centroids, labels=labels, inertia=inertia, iterations=done)
