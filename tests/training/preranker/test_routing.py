"""Difficulty-aware routing: quotas per request, cascade order, FLOPs accounting."""

from __future__ import annotations

import numpy as np

from training.preranker.routing import (
    cascade_probabilities,
    cascade_scores,
    rank_within_requests,
    routed_mask,
    routing_flops,
)


def test_rank_and_quota_per_request() -> None:
    light = np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.7], dtype=np.float32)
    offsets = np.array([0, 3, 7])
    np.testing.assert_array_equal(rank_within_requests(light, offsets), [2, 0, 1, 2, 3, 0, 1])
    # ceil(0.4 * 3) = 2 of the first request, ceil(0.4 * 4) = 2 of the second.
    np.testing.assert_array_equal(
        routed_mask(light, offsets, 0.4), [False, True, True, False, False, True, True]
    )
    assert routed_mask(light, offsets, 1.0).all()


def test_cascade_puts_routed_rows_first_in_expressive_order() -> None:
    light = np.array([3.0, 2.0, 1.0, 0.0], dtype=np.float32)
    expressive = np.array([-5.0, 5.0, 9.0, 9.0], dtype=np.float32)
    routed = np.array([True, True, False, False])
    final = cascade_scores(light, expressive, routed)
    assert list(np.argsort(-final)) == [1, 0, 2, 3]


def test_flops_share() -> None:
    light = {"per_candidate": 10.0, "per_request": 100.0}
    expressive = {"per_candidate": 100.0, "per_request": 1000.0}
    out = routing_flops(
        routed_rows=20, n_rows=100, n_requests=1, light=light, expressive=expressive
    )
    assert out["expressive_all"] == 100 * 100 + 1000
    assert out["cascade"] == 100 * 10 + 100 + 20 * 100 + 1000
    assert np.isclose(out["share"], 4100 / 11000)


def test_pooled_auc_of_a_cascade_is_judged_on_its_probabilities() -> None:
    """The order-carrying +1 ranks every request's routed rows above every other request's
    rest: a pooled AUC on it rose above both models (the report bolded it). The served
    probabilities keep each model's scale; with both models equal, so is the cascade's AUC."""
    from training.evaluation.metrics import auc

    rng = np.random.default_rng(0)
    n_requests, size = 200, 20
    offsets = np.arange(0, (n_requests + 1) * size, size)
    # Requests differ in base rate; the model knows it (a pooled AUC rewards that).
    base = np.repeat(rng.normal(0, 2, n_requests), size)
    logit = (base + rng.normal(0, 1, n_requests * size)).astype(np.float32)
    label = (rng.random(len(logit)) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    routed = routed_mask(logit, offsets, 0.2)
    model_auc = auc(label, logit)
    offset_auc = auc(label, cascade_scores(logit, logit, routed))
    served_auc = auc(label, cascade_probabilities(logit, logit, routed))
    assert abs(served_auc - model_auc) < 1e-9
    assert abs(offset_auc - model_auc) > 0.01  # what the report showed before
