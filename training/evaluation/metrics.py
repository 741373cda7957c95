"""Ranking and calibration metrics, vectorized with numpy.

AUC is computed from ranks (the Mann-Whitney statistic) with average ranks for ties, so a
constant score gets exactly 0.5; the weighted variant counts each (positive, negative) pair with
the product of the two weights, which is what "confidence-weighted AUC" means here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

Array = npt.ArrayLike


def auc(labels: Array, scores: Array, weights: Array | None = None) -> float:
    """Area under the ROC curve; NaN when only one class is present.

    Args:
        labels: 0/1 truth.
        scores: Higher means more likely positive.
        weights: Optional non-negative weight per row; a pair counts ``w_pos * w_neg``.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, np.float64)
    if y.all() or not y.any():
        return float("nan")
    if weights is None:
        ranks = rankdata(s)
        n_pos = int(y.sum())
        n_neg = len(y) - n_pos
        return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    w = np.asarray(weights, np.float64)
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    # Group ties: a tied (pos, neg) pair counts one half.
    _, starts = np.unique(s, return_index=True)
    w_pos = np.add.reduceat(np.where(y, w, 0.0), starts)
    w_neg = np.add.reduceat(np.where(~y, w, 0.0), starts)
    neg_below = np.concatenate([[0.0], np.cumsum(w_neg)[:-1]])
    total = (w_pos * (neg_below + 0.5 * w_neg)).sum()
    denom = w_pos.sum() * w_neg.sum()
    return float(total / denom) if denom > 0 else float("nan")


def upper_half(scores: Array, seed: int = 0) -> npt.NDArray[np.bool_]:
    """Mask of the rows in the top half by ``scores``, exactly half of them.

    Ties are broken at random (seeded), so a score with many equal values still splits the rows
    evenly instead of putting every tied row on one side.
    """
    values = np.asarray(scores)
    jitter = np.random.default_rng(seed).random(len(values))
    order = np.lexsort((jitter, values))
    mask = np.zeros(len(values), bool)
    mask[order[len(values) // 2 :]] = True
    return mask


def grouped_auc(groups: npt.NDArray[np.object_], labels: Array, scores: Array) -> float:
    """GAUC: per-group AUC averaged with weights = group size, over groups with both classes."""
    order = np.argsort(groups, kind="mergesort")
    g, y, s = groups[order], np.asarray(labels)[order], np.asarray(scores)[order]
    change = np.flatnonzero(g[1:] != g[:-1]) + 1
    total, weight = 0.0, 0
    for a, b in zip(np.r_[0, change], np.r_[change, len(g)], strict=True):
        value = auc(y[a:b], s[a:b])
        if not np.isnan(value):
            total += value * (b - a)
            weight += b - a
    return total / weight if weight else float("nan")


@dataclass(frozen=True)
class ReliabilityCurve:
    """Mean prediction vs observed rate per prediction bin."""

    bin_edges: npt.NDArray[np.float64]
    mean_predicted: npt.NDArray[np.float64]
    observed_rate: npt.NDArray[np.float64]
    counts: npt.NDArray[np.int64]

    @property
    def expected_calibration_error(self) -> float:
        """Count-weighted mean |predicted - observed| over non-empty bins."""
        used = self.counts > 0
        gaps = np.abs(self.mean_predicted[used] - self.observed_rate[used])
        return float((gaps * self.counts[used]).sum() / self.counts[used].sum())


def reliability_curve(labels: Array, predicted: Array, bins: int = 10) -> ReliabilityCurve:
    """Bin predictions into equal-count bins and compare with the observed positive rate."""
    p = np.asarray(predicted, np.float64)
    y = np.asarray(labels, np.float64)
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    if len(edges) == 1:
        # Every prediction equal (e.g. pseudo-labels at the click base rate): one bin.
        edges = np.repeat(edges, 2)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    n = len(edges) - 1
    counts = np.bincount(idx, minlength=n)
    mean_p = np.bincount(idx, weights=p, minlength=n) / np.maximum(counts, 1)
    rate = np.bincount(idx, weights=y, minlength=n) / np.maximum(counts, 1)
    return ReliabilityCurve(edges, mean_p, rate, counts.astype(np.int64))
