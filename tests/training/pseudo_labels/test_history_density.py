"""The history density: a kernel density of the user's positives at a candidate, and its weight."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from training.pseudo_labels.calibration import CalibrationError
from training.pseudo_labels.history_density import (
    EMPTY_HISTORY_DENSITY,
    fit_density_weight,
    history_log_density,
)
from training.pseudo_labels.job import PseudoLabelConfig


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_the_density_is_the_log_mean_kernel_over_the_set_s_history() -> None:
    vectors = _unit(12, 8, 0)
    history = np.array([[0, 1, 2], [3, -1, -1], [-1, -1, -1]], np.int32)
    item_index = np.array([5, 6, 7, 5, 8, 9])
    set_index = np.array([1, 0, 2, 0, 1, 0])
    got = history_log_density(vectors, item_index, history, set_index, 0.2)
    for row, (item, s) in enumerate(zip(item_index, set_index, strict=True)):
        hist = history[s][history[s] >= 0]
        if not len(hist):
            assert got[row] == EMPTY_HISTORY_DENSITY  # set 2 has no history
            continue
        expected = np.log(np.mean(np.exp(vectors[hist] @ vectors[item] / 0.2)))
        assert got[row] == pytest.approx(expected, rel=1e-5)


def test_a_small_temperature_follows_the_nearest_history_item() -> None:
    vectors = _unit(20, 16, 1)
    history = np.arange(10, dtype=np.int32)[None, :]
    items, sets = np.arange(10, 20), np.zeros(10, np.int64)
    tau = 1e-3
    got = history_log_density(vectors, items, history, sets, tau) * tau
    nearest = (vectors[10:] @ vectors[:10].T).max(axis=1)
    # No overflow at 1 / tau = 1000; the log of 1/10 (the mean) is all that separates them.
    np.testing.assert_allclose(got, nearest + tau * np.log(0.1), atol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        history_log_density(vectors, items, history, sets, 0.0)


def test_the_fitted_weight_recovers_the_clicks_mixture() -> None:
    rng = np.random.default_rng(2)
    base, density = rng.normal(size=200_000), rng.normal(size=200_000)
    clicks = (rng.random(200_000) < 1 / (1 + np.exp(-(1.5 * base + 3.0 * density - 2)))).astype(
        np.int8
    )
    weight = fit_density_weight(base, density, clicks)
    assert weight.fitted and not weight.clamped
    assert weight.weight == pytest.approx(2.0, rel=0.05)

    # A density that predicts fewer clicks is not used: weight 0, said so.
    against = (rng.random(200_000) < 1 / (1 + np.exp(-(base - density)))).astype(np.int8)
    assert fit_density_weight(base, density, against).weight == 0.0
    assert fit_density_weight(base, density, against).clamped
    with pytest.raises(CalibrationError, match="at least 5 clicked"):
        fit_density_weight(base[:10], density[:10], np.zeros(10, np.int8))


def test_the_default_weight_follows_the_relevance() -> None:
    assert PseudoLabelConfig(relevance="lm_likelihood").density_weight == "fitted"
    assert PseudoLabelConfig().density_weight == 0.0  # the paper's max cosine, as published
    assert PseudoLabelConfig(history_density_weight="fitted").density_weight == "fitted"
    assert PseudoLabelConfig(calibration="none").density_weight == 0.0
    with pytest.raises(ValidationError, match="needs calibration 'platt'"):
        PseudoLabelConfig(history_density_weight=1.0, calibration="none")
    with pytest.raises(ValidationError, match=">= 0"):
        PseudoLabelConfig(history_density_weight=-1.0)
    with pytest.raises(ValidationError, match="greater than 0"):
        PseudoLabelConfig(history_density_temperature=0)
