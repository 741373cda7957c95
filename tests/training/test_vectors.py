from __future__ import annotations

import numpy as np

from training.vectors import l2_normalize


def test_l2_normalize_unit_rows_zero_rows_and_any_leading_shape() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 8))
    x[1, 2] = 0.0
    out = l2_normalize(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    norms = np.linalg.norm(out, axis=-1)
    np.testing.assert_allclose(np.delete(norms.ravel(), 5), 1.0, rtol=1e-6)
    assert not out[1, 2].any()  # an all-zero vector stays zero, no NaN
    # Direction is kept: each output is a positive multiple of its input.
    np.testing.assert_allclose(out[0, 0] * np.linalg.norm(x[0, 0]), x[0, 0], rtol=1e-5)


def test_threads_change_no_bit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Large inputs are split over threads; every vector comes out exactly as on one thread."""
    import training.vectors as vectors

    monkeypatch.setattr(vectors, "THREADED_FROM_VALUES", 1)
    rng = np.random.default_rng(1)
    for x in (
        rng.standard_normal((101, 7, 16)).astype(np.float32),
        rng.standard_normal((257, 16)),  # float64 in, float32 out
        np.zeros((5, 4), np.float32),
    ):
        one = l2_normalize(x, workers=1)
        for workers in (2, 3, 8):
            many = l2_normalize(x, workers=workers)
            assert many.dtype == np.float32 and many.shape == x.shape
            np.testing.assert_array_equal(many, one)


def test_as_unit_keeps_unit_vectors_in_place_and_normalizes_the_rest() -> None:
    from training.vectors import as_unit

    rng = np.random.default_rng(3)
    unit = l2_normalize(rng.standard_normal((6, 5, 8)))
    unit[2, 1] = 0.0  # an all-zero vector counts as normalized (it stays zero either way)
    unit.flags.writeable = False  # e.g. a view of an Arrow buffer
    assert as_unit(unit) is unit
    scaled = unit * np.float32(3.0)
    np.testing.assert_allclose(as_unit(scaled), unit, atol=1e-6)
    one_off = unit.copy()
    one_off[4, 4] *= 1.001  # one vector a little too long is enough to normalize them all
    assert as_unit(one_off) is not one_off
    np.testing.assert_allclose(np.linalg.norm(as_unit(one_off)[4, 4]), 1.0, atol=1e-6)
    as64 = unit.astype(np.float64)  # other dtypes and layouts come back normalized float32
    assert as_unit(as64).dtype == np.float32
    strided = unit[:, ::2]
    assert as_unit(strided).flags.c_contiguous
    np.testing.assert_allclose(as_unit(strided), strided, atol=1e-6)
