"""The relevance kernels: max-pooled cosine per row, the same on any number of threads."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from numba.core.caching import NullCache

from training.pseudo_labels.relevance import (
    MIN_GROUP_ROWS,
    _fused_groups,
    _sliced_groups,
    _split_slices,
    default_slice_bytes,
    last_level_cache_bytes,
    max_cosine,
    max_cosine_blas,
    max_cosine_rows,
    slice_count,
)
from training.vectors import l2_normalize

KERNELS = [max_cosine, max_cosine_blas]


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


def _reference(emb, item_index, anchors, mask, set_index):  # type: ignore[no-untyped-def]
    cos = np.einsum("rd,rnd->rn", emb[item_index], anchors[set_index])
    cos[~mask[set_index]] = -np.inf
    return cos


@pytest.mark.parametrize("kernel", KERNELS)
def test_max_cosine_is_the_best_unmasked_anchor(case, kernel: Callable) -> None:  # type: ignore[no-untyped-def,type-arg]
    emb, item_index, anchors, mask, set_index = case
    relevance, matched = kernel(emb, item_index, anchors, mask, set_index, workers=1)
    cos = _reference(emb, item_index, anchors, mask, set_index)
    np.testing.assert_allclose(relevance, cos.max(axis=1), atol=1e-6)
    np.testing.assert_array_equal(matched, cos.argmax(axis=1))
    assert mask[set_index, matched].all()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("workers", [2, 3, 16])
def test_threads_change_nothing(case, kernel: Callable, workers: int) -> None:  # type: ignore[no-untyped-def,type-arg]
    emb, item_index, anchors, mask, set_index = case
    one = kernel(emb, item_index, anchors, mask, set_index, workers=1)
    many = kernel(emb, item_index, anchors, mask, set_index, workers=workers)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])


@pytest.mark.parametrize("width", [1, 2, 7, 10])
def test_fused_kernel_equals_the_blas_kernel(width: int) -> None:
    """Every block tail: groups of 1-9 rows (blocks of four), odd and even anchor counts."""
    rng = np.random.default_rng(width)
    emb = l2_normalize(rng.standard_normal((500, 384)).astype(np.float32))
    sets = 40
    counts = rng.integers(1, width + 1, sets)
    counts[0] = width
    mask = np.arange(width)[None] < counts[:, None]
    anchors = l2_normalize(rng.standard_normal((sets, width, 384)).astype(np.float32))
    set_index = np.repeat(np.arange(sets), rng.integers(1, 10, sets))
    rng.shuffle(set_index)
    item_index = rng.integers(0, 500, len(set_index))
    fused = max_cosine(emb, item_index, anchors, mask, set_index)
    blas = max_cosine_blas(emb, item_index, anchors, mask, set_index)
    np.testing.assert_allclose(fused[0], blas[0], atol=2e-6)
    cos = _reference(emb, item_index, anchors, mask, set_index)
    # The winner is the best slot up to float rounding (different summation orders).
    chosen = np.take_along_axis(cos, fused[1][:, None], axis=1)[:, 0]
    np.testing.assert_allclose(chosen, cos.max(axis=1), atol=2e-6)
    assert mask[set_index, fused[1]].all()


@pytest.fixture
def sliceable() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Enough rows per set for a batch to be cut into slices of the item table."""
    rng = np.random.default_rng(11)
    emb = l2_normalize(rng.standard_normal((500, 384)).astype(np.float32))
    anchors = l2_normalize(rng.standard_normal((6, 10, 384)).astype(np.float32))
    mask = np.arange(10)[None] < np.array([10, 3, 10, 1, 7, 10])[:, None]
    set_index = rng.integers(0, 5, 4000)  # set 5 unused
    return emb, rng.integers(0, 500, 4000), anchors, mask, set_index


@pytest.mark.parametrize("slice_bytes", [1536, 40_000, 10**9])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_slices_of_the_item_table_change_nothing(sliceable, slice_bytes: int, workers: int) -> None:  # type: ignore[no-untyped-def]
    emb, item_index, anchors, mask, set_index = sliceable
    whole = max_cosine(emb, item_index, anchors, mask, set_index, workers=1, slice_bytes=10**9)
    sliced = max_cosine(
        emb, item_index, anchors, mask, set_index, workers=workers, slice_bytes=slice_bytes
    )
    np.testing.assert_array_equal(sliced[0], whole[0])
    np.testing.assert_array_equal(sliced[1], whole[1])
    blas = max_cosine_blas(emb, item_index, anchors, mask, set_index)
    np.testing.assert_allclose(sliced[0], blas[0], atol=2e-6)


def test_sliced_groups_hold_every_row_once_by_slice_then_set(sliceable) -> None:  # type: ignore[no-untyped-def]
    _, item_index, _, _, set_index = sliceable
    order, starts, ends, sets, slices = _sliced_groups(item_index, set_index, 500, 6, 64)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(item_index)))
    assert starts[0] == 0 and ends[-1] == len(order)
    np.testing.assert_array_equal(starts[1:], ends[:-1])
    assert (np.diff(slices) >= 0).all() and slices.max() == 499 // 64
    for start, end, s, sl in zip(starts, ends, sets, slices, strict=True):
        rows = order[start:end]
        assert (set_index[rows] == s).all()
        assert (item_index[rows] // 64 == sl).all()
        assert (np.diff(rows) > 0).all()  # stable: request order kept within a group
    # One group per (slice, used set) pair that has rows, none for the unused set 5.
    assert len(starts) == len(np.unique((item_index // 64) * 6 + set_index))


@pytest.mark.parametrize("workers", [2, 3])
def test_every_thread_works_in_every_slice(workers: int) -> None:
    rng = np.random.default_rng(workers)
    item_index = rng.integers(0, 500, 20_000)
    set_index = rng.integers(0, 60, 20_000)
    _, starts, ends, _, slices = _sliced_groups(item_index, set_index, 500, 60, 100)
    parts = _split_slices(starts, ends, slices, workers)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(starts)))
    for part in parts:
        np.testing.assert_array_equal(np.unique(slices[part]), np.unique(slices))
        rows = (ends[part] - starts[part]).sum()
        assert abs(rows - len(item_index) / workers) < 0.1 * len(item_index)


def test_slice_count_is_bounded_by_the_cache_and_by_the_rows_per_group() -> None:
    mb = 2**20
    # 77 MB table, 12 MB slices: 7 slices when the batch has rows enough for them.
    assert slice_count(77 * mb, 524_288, 1_000, 12 * mb) == 7
    # Rows for only 3 groups of MIN_GROUP_ROWS per used set: 3 slices.
    assert slice_count(77 * mb, 3 * 1_000 * MIN_GROUP_ROWS + 5, 1_000, 12 * mb) == 3
    # Fewer rows than MIN_GROUP_ROWS per set, or a table that fits one slice: one slice.
    assert slice_count(77 * mb, 1_000 * (MIN_GROUP_ROWS - 1), 1_000, 12 * mb) == 1
    assert slice_count(5 * mb, 10**7, 10, 12 * mb) == 1
    assert slice_count(77 * mb, 0, 0, 12 * mb) == 1


def test_cache_size_is_read_or_falls_back() -> None:
    assert last_level_cache_bytes() >= 2**20
    assert default_slice_bytes() == last_level_cache_bytes() // 3


@pytest.mark.parametrize("workers", [1, 2])
def test_anchors_as_rows_of_a_shared_table(sliceable, workers: int) -> None:  # type: ignore[no-untyped-def]
    """Anchors given as catalog rows (repeats across sets allowed) score as their vectors do."""
    emb, item_index, _, mask, set_index = sliceable
    rows = np.random.default_rng(5).integers(0, len(emb), mask.shape)
    rows[~mask] = 0  # padded slots: any valid row
    by_rows = max_cosine_rows(emb, item_index, emb, rows, mask, set_index, workers=workers)
    by_vectors = max_cosine(emb, item_index, emb[rows], mask, set_index, workers=workers)
    np.testing.assert_array_equal(by_rows[0], by_vectors[0])
    np.testing.assert_array_equal(by_rows[1], by_vectors[1])


def test_anchor_rows_out_of_range_are_refused() -> None:
    table = np.eye(3, dtype=np.float32)
    mask = np.array([[True, False]])
    # A padded slot may hold anything; a real one must be a row of the table.
    max_cosine_rows(table, np.array([0]), table, np.array([[2, 99]]), mask, np.array([0]))
    with pytest.raises(ValueError, match="anchor_rows holds values outside"):
        max_cosine_rows(table, np.array([0]), table, np.array([[3, 0]]), mask, np.array([0]))


def test_a_set_without_anchors_scores_minus_infinity() -> None:
    emb = l2_normalize(np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32))
    anchors = np.zeros((2, 3, 8), np.float32)
    anchors[0] = emb[:3]
    mask = np.array([[True, True, True], [False, False, False]])
    relevance, matched = max_cosine(emb, np.array([0, 1, 2]), anchors, mask, np.array([0, 1, 0]))
    assert relevance[1] == -np.inf and matched[1] == 0
    np.testing.assert_allclose(relevance[[0, 2]], 1.0, atol=1e-6)
    np.testing.assert_array_equal(matched[[0, 2]], [0, 2])


def test_anchor_mask_must_list_real_anchors_first() -> None:
    mask = np.array([[True, False, True]])
    with pytest.raises(ValueError, match="real anchors first"):
        max_cosine(
            np.eye(3, dtype=np.float32),
            np.array([0]),
            np.eye(3, dtype=np.float32)[None],
            mask,
            np.array([0]),
        )


@pytest.mark.parametrize(
    ("item", "anchor_set", "name"),
    [(-1, 0, "item_index"), (3, 0, "item_index"), (0, 1, "set_index")],
)
def test_out_of_range_indices_are_refused(item: int, anchor_set: int, name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} holds values outside"):
        max_cosine(
            np.eye(3, dtype=np.float32),
            np.array([0, item]),
            np.eye(3, dtype=np.float32)[None],
            np.ones((1, 3), bool),
            np.array([0, anchor_set]),
        )


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_rows(kernel: Callable) -> None:  # type: ignore[type-arg]
    relevance, matched = kernel(
        np.zeros((3, 4), np.float32),
        np.zeros(0, np.int64),
        np.zeros((1, 2, 4), np.float32),
        np.ones((1, 2), bool),
        np.zeros(0, np.int64),
    )
    assert relevance.shape == matched.shape == (0,)


def test_the_kernel_is_cached_on_disk_where_numba_can_write() -> None:
    assert not isinstance(_fused_groups._cache, NullCache)
