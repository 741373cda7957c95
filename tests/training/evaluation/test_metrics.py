from __future__ import annotations

import numpy as np
import pytest

from training.evaluation.metrics import auc, grouped_auc, reliability_curve, upper_half


def brute_auc(y, s, w=None):  # type: ignore[no-untyped-def]
    w = np.ones(len(y)) if w is None else w
    num = den = 0.0
    for i in np.flatnonzero(y == 1):
        for j in np.flatnonzero(y == 0):
            pair = w[i] * w[j]
            num += pair * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
            den += pair
    return num / den


def test_auc_matches_brute_force_with_ties_and_weights() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 10, 200).astype(float)  # many ties
    w = rng.random(200)
    assert auc(y, s) == pytest.approx(brute_auc(y, s))
    assert auc(y, s, w) == pytest.approx(brute_auc(y, s, w))


def test_auc_edge_cases() -> None:
    assert auc(np.array([0, 1, 0, 1]), np.zeros(4)) == 0.5
    assert auc(np.array([0, 0, 1, 1]), np.array([1, 2, 3, 4])) == 1.0
    assert np.isnan(auc(np.ones(3), np.arange(3)))


def test_grouped_auc_skips_single_class_groups() -> None:
    groups = np.array(["a", "a", "b", "b", "c"], dtype=object)
    y = np.array([0, 1, 1, 0, 1])
    s = np.array([0.1, 0.9, 0.2, 0.8, 0.5])
    assert grouped_auc(groups, y, s) == pytest.approx(0.5)  # a: 1.0, b: 0.0


def test_reliability_curve_of_a_calibrated_predictor() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(int)
    curve = reliability_curve(y, p, bins=10)
    assert curve.expected_calibration_error < 0.01
    assert curve.counts.sum() == 200_000


def test_reliability_curve_of_a_constant_predictor_is_one_bin() -> None:
    """Pseudo-labels all at the click base rate (a clamped Platt slope) once crashed it."""
    y = np.array([0, 1, 0, 0])
    curve = reliability_curve(y, np.full(4, 0.25), bins=10)
    assert curve.counts.tolist() == [4]
    assert curve.mean_predicted.tolist() == [0.25] and curve.observed_rate.tolist() == [0.25]
    assert curve.expected_calibration_error == 0.0


def test_upper_half_splits_ties_evenly_and_keeps_the_top() -> None:
    scores = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.5, 1.0])
    mask = upper_half(scores, seed=3)
    assert mask.sum() == 4 and mask[5] and not mask[0] and not mask[6]
    assert np.array_equal(mask, upper_half(scores, seed=3))  # seeded
    assert upper_half(np.ones(7)).sum() == 4  # odd count: the upper half takes the extra row
