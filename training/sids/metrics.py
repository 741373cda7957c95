"""Quality figures of a Semantic ID quantizer: code usage, reconstruction and coherence."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def utilization(codes: npt.NDArray[np.integer], codebook_size: int) -> list[float]:
    """Per level, the share of the ``codebook_size`` codes used by at least one item."""
    return [
        float(np.unique(codes[:, level]).size / codebook_size) for level in range(codes.shape[1])
    ]


def perplexity(codes: npt.NDArray[np.integer], codebook_size: int) -> list[float]:
    """Per level, ``exp(entropy)`` of the code distribution: the effective number of codes.

    Equals ``codebook_size`` when items spread evenly over every code, 1 when all share one.
    """
    result = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size).astype(np.float64)
        p = counts[counts > 0] / max(counts.sum(), 1.0)
        result.append(float(np.exp(-(p * np.log(p)).sum())))
    return result


def reconstruction(
    x: npt.NDArray[np.float32], x_hat: npt.NDArray[np.float32]
) -> tuple[float, float]:
    """Mean squared error per element and mean cosine similarity between rows of two matrices."""
    mse = float(np.mean((x - x_hat) ** 2))
    num = (x * x_hat).sum(1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1)
    cosine = float(np.mean(num / np.maximum(den, 1e-12)))
    return mse, cosine


def coherence(
    vectors: npt.NDArray[np.float32],
    first_codes: npt.NDArray[np.integer],
    *,
    pairs: int,
    seed: int,
) -> dict[str, float]:
    """How much more alike items sharing a first-level code are than random pairs.

    Samples ``pairs`` item pairs that share their first code (uniformly over such pairs) and
    ``pairs`` random pairs of distinct items, and compares their mean cosine similarity.

    Args:
        vectors: ``(N, D)`` unit content vectors.
        first_codes: ``(N,)`` first-level codes.
        pairs: Pairs sampled of each kind.
        seed: Sampling seed.

    Returns:
        ``same_code_cosine``, ``random_cosine`` and their ``ratio``.
    """
    rng = np.random.default_rng(seed)
    n = len(vectors)
    a = rng.integers(0, n, pairs)
    b = (a + rng.integers(1, n, pairs)) % n
    random_cos = float(np.mean((vectors[a] * vectors[b]).sum(1)))

    # Pick a group with probability proportional to its number of pairs, then two members.
    order = np.argsort(first_codes, kind="stable")
    codes_sorted = first_codes[order]
    starts = np.flatnonzero(np.r_[True, codes_sorted[1:] != codes_sorted[:-1]])
    sizes = np.diff(np.r_[starts, n])
    weights = sizes * (sizes - 1) / 2.0
    if weights.sum() == 0:
        return {
            "same_code_cosine": float("nan"),
            "random_cosine": random_cos,
            "ratio": float("nan"),
        }
    groups = rng.choice(len(sizes), pairs, p=weights / weights.sum())
    i = rng.integers(0, sizes[groups])
    j = (i + rng.integers(1, sizes[groups])) % sizes[groups]
    left = order[starts[groups] + i]
    right = order[starts[groups] + j]
    same_cos = float(np.mean((vectors[left] * vectors[right]).sum(1)))
    ratio = same_cos / random_cos if random_cos > 0 else float("inf")
    return {"same_code_cosine": same_cos, "random_cosine": random_cos, "ratio": ratio}
