"""Difficulty-aware routing: the light model scores all, the expressive one re-scores the top M.

Within each request the ``ceil(M x n)`` candidates with the highest light scores are "hard"
(the ones whose order decides what reaches the ranker) and get the expressive model's score;
the final order puts them first, by expressive score, then the rest by light score. Scores are
mapped to probabilities and routed ones offset by +1 so one number carries that order.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


def rank_within_requests(scores: F32, offsets: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """0-based rank of each row within its request by descending score (ties: row order)."""
    n = len(scores)
    request = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    order = np.lexsort((np.arange(n), -scores, request))
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n) - np.repeat(offsets[:-1], np.diff(offsets))
    return ranks


def routed_mask(
    light: F32, offsets: npt.NDArray[np.int64], fraction: float
) -> npt.NDArray[np.bool_]:
    """Rows the expressive model re-scores: the top ``ceil(fraction x n)`` of each request."""
    sizes = np.diff(offsets)
    quota = np.ceil(fraction * sizes).astype(np.int64)
    return rank_within_requests(light, offsets) < np.repeat(quota, sizes)


def sigmoid(x: F32) -> F32:
    """Logits to probabilities (float32)."""
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def cascade_scores(light: F32, expressive: F32, routed: npt.NDArray[np.bool_]) -> F32:
    """One score per row whose order within a request is the cascade's order.

    For per-request metrics only: the +1 puts every routed row above every other row of *any*
    request, so a pooled AUC on it measures that offset, not the models (use
    :func:`cascade_probabilities`).
    """
    return np.where(routed, 1.0 + sigmoid(expressive), sigmoid(light)).astype(np.float32)


def cascade_probabilities(light: F32, expressive: F32, routed: npt.NDArray[np.bool_]) -> F32:
    """The probability the cascade serves for each row: the expressive model's where routed."""
    return np.where(routed, sigmoid(expressive), sigmoid(light)).astype(np.float32)


def routing_flops(
    routed_rows: int,
    n_rows: int,
    n_requests: int,
    light: dict[str, float],
    expressive: dict[str, float],
) -> dict[str, float]:
    """FLOPs of the cascade and of the expressive model on every candidate."""
    cascade = (
        n_rows * light["per_candidate"]
        + n_requests * light["per_request"]
        + routed_rows * expressive["per_candidate"]
        + (n_requests * expressive["per_request"] if routed_rows else 0.0)
    )
    full = n_rows * expressive["per_candidate"] + n_requests * expressive["per_request"]
    return {"cascade": cascade, "expressive_all": full, "share": cascade / full}
