"""Platt scaling: relevance -> click probability, fitted on exposed rows where clicks are known.

Pseudo-labels must live on the same scale as real labels, or the fused loss would weigh them
arbitrarily. A one-feature logistic regression ``P(click | r) = sigmoid(a r + b)`` fitted on the
exposed rows (whose relevance is computed exactly like the unexposed rows') gives that scale.
:func:`fit_logistic` is the fit itself, for any number of features: the history density's weight
(:mod:`training.pseudo_labels.history_density`) is fitted by it with two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


class CalibrationError(ValueError):
    """Calibration cannot be fitted on the data given."""


@dataclass(frozen=True)
class PlattScaler:
    """``P(click | r) = sigmoid(a * r + b)``."""

    a: float
    b: float
    clamped: bool = False
    """The fit's slope came out negative and was set to 0 (see :func:`fit_platt`)."""

    def __call__(self, relevance: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Calibrated click probability of each relevance value."""
        z = self.a * relevance.astype(np.float64) + self.b
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def fit_logistic(
    features: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int8],
    *,
    l2: float = 1e-3,
    min_per_class: int = 5,
    iterations: int = 50,
) -> npt.NDArray[np.float64]:
    """Logistic regression by Newton's method (a tiny L2 penalty keeps separable data finite).

    Args:
        features: ``(n,)`` or ``(n, k)`` features of the exposed rows.
        labels: Their clicks (0/1).
        l2: The penalty on every coefficient.
        min_per_class: Fewest clicked and unclicked rows the fit accepts.
        iterations: Most Newton steps.

    Returns:
        ``k + 1`` coefficients: one per feature, then the intercept.

    Raises:
        CalibrationError: when fewer than ``min_per_class`` positives or negatives are given, when
            a feature value is not finite, or when the fit does not converge to finite values.
    """
    x = features.astype(np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if not np.isfinite(x).all():
        raise CalibrationError(
            f"Platt scaling got {int((~np.isfinite(x)).sum())} non-finite relevance "
            "values; every exposed row it is fitted on must have a finite relevance"
        )
    y = labels.astype(np.float64)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives < min_per_class or negatives < min_per_class:
        raise CalibrationError(
            f"Platt scaling needs at least {min_per_class} clicked and {min_per_class} unclicked "
            f"exposed rows with anchors; got {positives} and {negatives}. Use calibration='none'."
        )
    x = np.concatenate([x, np.ones((len(y), 1))], axis=1)
    # Start from the base rate so the first Newton step is well conditioned.
    w = np.zeros(x.shape[1])
    w[-1] = np.log(positives / negatives)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    if not np.isfinite(w).all():
        raise CalibrationError(f"the logistic fit diverged (coefficients {w.tolist()})")
    return w


def fit_platt(
    relevance: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int8],
    *,
    l2: float = 1e-3,
    min_per_class: int = 5,
    iterations: int = 50,
) -> PlattScaler:
    """Fit Platt scaling: :func:`fit_logistic` on the one relevance feature.

    The mapping is kept non-decreasing: a negative fitted slope is replaced by 0 (every value
    mapped to the click base rate) and the result marked ``clamped``.

    Raises:
        CalibrationError: as :func:`fit_logistic`.
    """
    w = fit_logistic(relevance, labels, l2=l2, min_per_class=min_per_class, iterations=iterations)
    if w[0] < 0:
        # Clicks fall as relevance rises on the exposed rows: a negative slope would turn every
        # pseudo-label upside down (the closest candidates labelled least likely). Relevance is
        # GPL's claim of interest, so the mapping is kept non-decreasing: slope 0, every label
        # the click base rate, and the caller is told.
        positives = int(labels.sum())
        base_rate = np.log(positives / (len(labels) - positives))
        return PlattScaler(a=0.0, b=float(base_rate), clamped=True)
    return PlattScaler(a=float(w[0]), b=float(w[1]))
