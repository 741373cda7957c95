"""The user's history density at a candidate: a kernel density estimate in the content space.

``relevance: lm_likelihood`` scores a candidate by what the anchor LM believes of it. The LM reads
the history as a sequence of codes and spreads its belief over the whole catalog; a kernel
density over the same history, in the frozen content space, says how close the candidate sits to
what the user actually engaged with, item by item:

    d(c) = log( (1 / |H|) * sum_{h in H} exp(cos(e_c, e_h) / tau) )

with ``H`` the anchor set's history (the user's latest ``history_items`` positives strictly
before its cutoff, as the LM's prompt and the historical-consistency factor use) and ``tau`` the
kernel's temperature: small, and ``d`` follows the nearest history item (``max cos / tau``);
large, and it follows the mean cosine. The job adds ``w * d`` to the LM's log-probability (a
product of the two experts, ``p_LM(c) * density(c) ** w``), with ``w`` fitted on the exposed
clicks (:func:`fit_density_weight`). docs/pseudo_labels.md gives the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from training.pseudo_labels.calibration import fit_logistic

EMPTY_HISTORY_DENSITY = 0.0
"""``d`` of a set without history: the value of a history orthogonal to the candidate."""


def history_log_density(
    item_embeddings: npt.NDArray[np.float32],
    item_index: npt.NDArray[np.int64],
    history_rows: npt.NDArray[np.integer],
    set_index: npt.NDArray[np.int64],
    temperature: float,
) -> npt.NDArray[np.float32]:
    """``d`` of each row: its item against its anchor set's history (module docstring).

    Rows are grouped by set, so each set's history vectors are gathered once and its candidates
    scored by one matrix product.

    Args:
        item_embeddings: ``(n_items, D)`` unit content vectors of the catalog.
        item_index: ``(R,)`` each row's item (a row of ``item_embeddings``; all valid).
        history_rows: ``(S, L)`` each set's history items (rows of ``item_embeddings``), ``-1``
            where the history is shorter than ``L``.
        set_index: ``(R,)`` each row's set (all valid).
        temperature: The kernel's ``tau`` (> 0).

    Returns:
        ``(R,)`` float32; :data:`EMPTY_HISTORY_DENSITY` for the rows of a set without history.
    """
    if temperature <= 0:
        raise ValueError(f"the history density's temperature must be > 0, got {temperature}")
    out = np.full(len(set_index), EMPTY_HISTORY_DENSITY, np.float32)
    if not len(set_index):
        return out
    order = np.argsort(set_index, kind="stable")
    sets, starts = np.unique(set_index[order], return_index=True)
    bounds = np.append(starts, len(order))
    for k, s in enumerate(sets):
        history = history_rows[s]
        history = history[history >= 0]
        if not len(history):
            continue
        rows = order[bounds[k] : bounds[k + 1]]
        z = (item_embeddings[item_index[rows]] @ item_embeddings[history].T) / temperature
        top = z.max(axis=1)
        # log-mean-exp, shifted by the row's maximum so no exponent overflows at small tau.
        out[rows] = top + np.log(np.exp(z - top[:, None]).mean(axis=1))
    return out


@dataclass(frozen=True)
class DensityWeight:
    """How much of the history density goes into the relevance, and how it was chosen."""

    weight: float
    fitted: bool
    clamped: bool = False
    """The fit gave a negative weight (or a non-positive one to the LM) and 0 was used."""


def fit_density_weight(
    base: npt.NDArray[np.float32],
    density: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int8],
    *,
    l2: float = 1e-3,
) -> DensityWeight:
    """``w`` in ``relevance = base + w * density``, from the exposed clicks.

    A two-feature logistic regression ``P(click) = sigmoid(a * base + b * density + c)`` on the
    exposed rows; ``w = b / a``. Platt scaling of the combined relevance then recovers the same
    fit, so the pseudo-labels are that regression's click probabilities. The weight is kept
    non-negative, as Platt's slope is: a density that predicts fewer clicks, or an LM whose
    coefficient is not positive, leaves the relevance as the LM alone (``clamped``).

    Raises:
        training.pseudo_labels.calibration.CalibrationError: as
            :func:`training.pseudo_labels.calibration.fit_logistic`.
    """
    coef = fit_logistic(np.stack([base, density], axis=1), labels, l2=l2)
    a, b = float(coef[0]), float(coef[1])
    if a <= 0 or b < 0:
        return DensityWeight(weight=0.0, fitted=True, clamped=True)
    return DensityWeight(weight=b / a, fitted=True)


__all__ = [
    "EMPTY_HISTORY_DENSITY",
    "DensityWeight",
    "fit_density_weight",
    "history_log_density",
]
