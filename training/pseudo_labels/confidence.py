"""How much an anchor set deserves trust: three factors in [0, 1] and their combination.

The formulas are documented in ``docs/pseudo_labels.md``:

* *semantic dispersion*: the mean resultant length ``|| mean_k a_k ||`` of the (unit) anchor
  embeddings, weighted by the anchors' beam probabilities. 1 when every anchor points the same
  way (a focused, consistent interest), near 0 when they scatter over unrelated content.
* *historical consistency*, in one of two forms (:data:`HistoryForm`). ``coverage`` (default):
  how much of the user's history the anchor set accounts for, the mean over the user's positive
  items before the cutoff of ``max(0, max_k cos(h, a_k))``; a set that leaves some of the user's
  interests without a nearby anchor will under-rate the candidates of those interests.
  ``matched``: for each anchor, ``max(0, max_h cos(a_k, h))``: an anchor that resembles
  something the user really engaged with is more credible than one far from the whole history.
* *LM-intrinsic confidence*: the matched anchor's sequence probability normalized within the
  user's beam, ``p_k / max_j p_j`` with ``p = softmax(log_probs)``: the best beam gets 1, one the
  model found ten times less likely gets 0.1.

Combination (default): a weighted geometric mean ``exp(sum w_i log f_i / sum w_i)``; any factor
near 0 vetoes trust, which an arithmetic mean would not do.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from training.threads import default_workers

FLOOR = 1e-6
"""Factors are floored here before the geometric mean so that log(0) cannot occur."""

HistoryForm = Literal["coverage", "matched"]
"""Historical consistency per anchor set (``coverage``) or per matched anchor (``matched``)."""


@dataclass(frozen=True)
class AnchorVectors:
    """Every set's anchor vectors as rows of one matrix: slot ``(s, k)`` is ``vectors[rows[s, k]]``.

    The anchors are catalog items, so ``vectors`` can be the catalog's own table and a set then
    costs ``N`` integers instead of ``N x D`` floats; :meth:`of` wraps a plain ``(S, N, D)`` array.
    """

    vectors: npt.NDArray[np.float32]
    """``(M, D)`` unit vectors."""
    rows: npt.NDArray[np.int64]
    """``(S, N)`` row of ``vectors`` per set and slot (any valid row in padded slots)."""

    @classmethod
    def of(cls, anchors: npt.NDArray[np.float32]) -> AnchorVectors:
        """Wrap an ``(S, N, D)`` array (no copy when it is contiguous)."""
        n_sets, n_slots, dim = anchors.shape
        return cls(
            vectors=np.ascontiguousarray(anchors, np.float32).reshape(n_sets * n_slots, dim),
            rows=np.arange(n_sets * n_slots, dtype=np.int64).reshape(n_sets, n_slots),
        )

    def take(self, sets: slice) -> npt.NDArray[np.float32]:
        """The ``(C, N, D)`` vectors of a range of sets (a gathered copy)."""
        return self.vectors[self.rows[sets]]


def dispersion_factors(
    anchors: AnchorVectors,
    mask: npt.NDArray[np.bool_],
    log_probs: npt.NDArray[np.float32],
    chunk: int = 4096,
) -> npt.NDArray[np.float32]:
    """:func:`dispersion_factor` of every set, gathering ``chunk`` sets' vectors at a time."""
    n_sets = len(mask)
    out = np.zeros(n_sets, np.float32)
    for start in range(0, n_sets, chunk):
        rows = slice(start, start + chunk)
        out[rows] = dispersion_factor(anchors.take(rows), mask[rows], log_probs[rows])
    return out


def dispersion_factor(
    anchors: npt.NDArray[np.float32],
    mask: npt.NDArray[np.bool_],
    log_probs: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """Probability-weighted mean resultant length of each anchor set: ``(S, N, D) -> (S,)``."""
    weights = beam_probabilities(log_probs, mask)
    resultant = np.einsum("sn,snd->sd", weights, anchors)
    return np.clip(np.linalg.norm(resultant, axis=1), 0.0, 1.0).astype(np.float32)


def beam_probabilities(
    log_probs: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float32]:
    """Softmax of each set's sequence log-probabilities over its real anchors: ``(S, N)``."""
    masked = np.where(mask, log_probs, -np.inf)
    top = masked.max(axis=1, keepdims=True, initial=-np.inf)  # zero slots: -inf
    top = np.where(np.isfinite(top), top, 0.0)
    expd = np.where(mask, np.exp(masked - top), 0.0)
    total = expd.sum(axis=1, keepdims=True)
    return (expd / np.maximum(total, 1e-30)).astype(np.float32)


def lm_factor(
    log_probs: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float32]:
    """Per-anchor ``p_k / max_j p_j`` within the set: ``(S, N)``, 0 for padded slots."""
    masked = np.where(mask, log_probs, -np.inf)
    top = masked.max(axis=1, keepdims=True, initial=-np.inf)  # zero slots: -inf
    top = np.where(np.isfinite(top), top, 0.0)
    return np.where(mask, np.exp(masked - top), 0.0).astype(np.float32)


def history_factor(
    anchors: npt.NDArray[np.float32],
    history: npt.NDArray[np.float32],
    form: HistoryForm = "coverage",
) -> npt.NDArray[np.float32]:
    """Historical consistency of one set's anchors: ``(N, D), (H, D) -> (N,)``.

    ``matched``: each anchor's ``max(0, max_h cos(a_k, h))``. ``coverage``: the set's
    ``mean_h max(0, max_k cos(h, a_k))``, the same for every anchor. 0 without history.
    """
    if len(history) == 0 or len(anchors) == 0:
        return np.zeros(len(anchors), np.float32)
    sims = np.clip(anchors @ history.T, 0.0, 1.0)
    if form == "matched":
        return sims.max(axis=1).astype(np.float32)
    return np.full(len(anchors), sims.max(axis=0).mean(), np.float32)


def combine(
    factors: list[npt.NDArray[np.float32]],
    weights: list[float],
    method: Literal["geometric", "arithmetic"] = "geometric",
) -> npt.NDArray[np.float32]:
    """Combine factors in [0, 1] into one confidence in [0, 1]."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("confidence weights must sum to a positive number")
    if method == "geometric":
        logs = sum(
            w * np.log(np.clip(f, FLOOR, 1.0)) for f, w in zip(factors, weights, strict=True)
        )
        return np.exp(np.asarray(logs) / total).astype(np.float32)
    mixed = sum(w * np.clip(f, 0.0, 1.0) for f, w in zip(factors, weights, strict=True))
    return (np.asarray(mixed) / total).astype(np.float32)


def history_factors(
    anchors: AnchorVectors,
    mask: npt.NDArray[np.bool_],
    items: npt.NDArray[np.float32],
    history: npt.NDArray[np.int64],
    chunk: int = 256,
    workers: int | None = None,
    form: HistoryForm = "coverage",
) -> npt.NDArray[np.float32]:
    """:func:`history_factor` of every set at once: ``(S, N), (I, D), (S, H) -> (S, N)``.

    Args:
        anchors: Unit anchor embeddings per set.
        mask: Which anchor slots are real (padded slots get 0).
        items: Unit item embeddings.
        history: Rows of ``items`` of each set's history, -1 for none.
        chunk: Sets per batched matrix product (bounds the gathered history's memory).
        workers: Threads the chunks are spread over (default: one per core); numpy's gathers
            and products release the GIL, and each chunk's result does not depend on it.
        form: ``coverage`` (one value per set, repeated over its real slots) or ``matched``
            (one per anchor).
    """
    n_sets, n_anchors = mask.shape
    out = np.zeros((n_sets, n_anchors), np.float32)

    def one(start: int) -> None:
        rows = slice(start, start + chunk)
        hist = history[rows]
        known = hist >= 0
        # Histories are right-aligned: drop the leading columns no set of the chunk uses.
        used = known.any(axis=0)
        if not used.any():
            return
        first = int(np.argmax(used))
        hist, known = hist[:, first:], known[:, first:]
        gathered = items[np.where(known, hist, 0)]  # (C, H, D)
        sims = np.matmul(anchors.take(rows), gathered.transpose(0, 2, 1))  # (C, N, H)
        real = mask[rows]
        if form == "matched":
            per_anchor = np.where(known[:, None, :], sims, -np.inf).max(axis=2)
            best = np.where(np.isfinite(per_anchor), np.clip(per_anchor, 0.0, 1.0), 0.0)
        else:
            # Each history item's nearest real anchor, averaged over the known history items.
            per_item = np.where(real[:, :, None], sims, -np.inf).max(axis=1, initial=-np.inf)
            per_item = np.where(known & np.isfinite(per_item), np.clip(per_item, 0.0, 1.0), 0.0)
            covered = per_item.sum(axis=1) / np.maximum(known.sum(axis=1), 1)
            best = np.broadcast_to(covered[:, None].astype(np.float32), real.shape)
        out[rows] = np.where(real, best, 0.0)  # chunks write disjoint rows

    starts = range(0, n_sets, chunk)
    workers = min(workers or default_workers(), len(starts))
    if workers <= 1:
        for start in starts:
            one(start)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, starts))
    return out
