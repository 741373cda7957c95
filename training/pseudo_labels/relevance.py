"""Max-pooled cosine relevance of candidates to a user's interest anchors.

All vectors are L2-normalized, so a dot product is a cosine. Rows are processed grouped by anchor
set: each group is one ``(m x D) @ (D x N)`` matrix product against that set's ``N`` anchors, so
the anchors are loaded once per user and cutoff and reused for every candidate of every request
that uses them, never recomputed per candidate.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatMatrix = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def l2_normalize(x: FloatMatrix, eps: float = 1e-12) -> FloatMatrix:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


def max_cosine(
    item_embeddings: FloatMatrix,
    item_index: IntArray,
    anchors: npt.NDArray[np.float32],
    anchor_mask: npt.NDArray[np.bool_],
    set_index: IntArray,
) -> tuple[npt.NDArray[np.float32], IntArray]:
    """Relevance r = max over a row's anchors of cos(candidate, anchor), and which anchor won.

    Args:
        item_embeddings: ``(n_items, D)`` normalized item content embeddings.
        item_index: ``(R,)`` row -> item row in ``item_embeddings``.
        anchors: ``(S, N, D)`` normalized anchor embeddings of ``S`` anchor sets.
        anchor_mask: ``(S, N)`` which anchor slots are real (sets may have fewer than ``N``).
        set_index: ``(R,)`` row -> anchor set.

    Returns:
        ``(relevance, matched)``: float32 ``(R,)`` and the winning anchor slot ``(R,)``.
    """
    rows = len(item_index)
    relevance = np.empty(rows, np.float32)
    matched = np.empty(rows, np.int64)
    if rows == 0:
        return relevance, matched
    order = np.argsort(set_index, kind="stable")
    sorted_sets = set_index[order]
    bounds = np.flatnonzero(np.diff(sorted_sets)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [rows]])
    # Masked slots score -inf so they can never be the maximum.
    penalty = np.where(anchor_mask, 0.0, -np.inf).astype(np.float32)
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        s = int(sorted_sets[start])
        rows_here = order[start:end]
        scores = item_embeddings[item_index[rows_here]] @ anchors[s].T
        scores += penalty[s]
        best = scores.argmax(axis=1)
        matched[rows_here] = best
        relevance[rows_here] = scores[np.arange(len(best)), best]
    return relevance, matched
