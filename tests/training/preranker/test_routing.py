"""Difficulty-aware routing: quotas per request, cascade order, FLOPs accounting."""

from __future__ import annotations

import numpy as np

from training.preranker.routing import (
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
