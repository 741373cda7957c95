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
