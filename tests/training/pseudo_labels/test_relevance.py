"""The relevance kernel: max-pooled cosine per row, the same on any number of threads."""

from __future__ import annotations

import numpy as np
import pytest

from training.pseudo_labels.relevance import max_cosine
from training.vectors import l2_normalize


@pytest.fixture
def case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    emb = l2_normalize(rng.standard_normal((300, 16)).astype(np.float32))
    anchors = l2_normalize(rng.standard_normal((7, 5, 16)).astype(np.float32))
    mask = np.ones((7, 5), bool)
    mask[2, 3:] = False  # a set with 3 anchors
    mask[5, 1:] = False  # a set with 1 anchor
    sizes = [1, 40, 3, 0, 90, 17, 2]  # uneven groups, one set unused
    set_index = np.repeat(np.arange(7), sizes)
    rng.shuffle(set_index)
    item_index = rng.integers(0, 300, len(set_index))
    return emb, item_index, anchors, mask, set_index


def test_max_cosine_is_the_best_unmasked_anchor(case) -> None:  # type: ignore[no-untyped-def]
    emb, item_index, anchors, mask, set_index = case
    relevance, matched = max_cosine(emb, item_index, anchors, mask, set_index, workers=1)
    cos = np.einsum("rd,rnd->rn", emb[item_index], anchors[set_index])
    cos[~mask[set_index]] = -np.inf
    np.testing.assert_allclose(relevance, cos.max(axis=1), atol=1e-6)
    np.testing.assert_array_equal(matched, cos.argmax(axis=1))
    assert mask[set_index, matched].all()


@pytest.mark.parametrize("workers", [2, 3, 16])
def test_threads_change_nothing(case, workers: int) -> None:  # type: ignore[no-untyped-def]
    emb, item_index, anchors, mask, set_index = case
    one = max_cosine(emb, item_index, anchors, mask, set_index, workers=1)
    many = max_cosine(emb, item_index, anchors, mask, set_index, workers=workers)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])


def test_no_rows() -> None:
    relevance, matched = max_cosine(
        np.zeros((3, 4), np.float32),
        np.zeros(0, np.int64),
        np.zeros((1, 2, 4), np.float32),
        np.ones((1, 2), bool),
        np.zeros(0, np.int64),
    )
    assert relevance.shape == matched.shape == (0,)
