"""One contiguous Arrow array from numpy strings, however many."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training.arrow import string_array


def test_many_numpy_strings_become_one_array() -> None:
    # pyarrow 26 cuts a numpy <U10 array of 2M values into two chunks.
    values = np.array([f"<a_{i % 1000:03d}>" for i in range(2_000_000)])
    out = string_array(values)
    assert isinstance(out, pa.StringArray) and len(out) == len(values)
    assert out[1_999_999].as_py() == values[-1]
    # What failed before: builders that take one Array.
    offsets = pa.array(np.arange(0, len(values) + 1, 4, dtype=np.int32))
    assert len(pa.ListArray.from_arrays(offsets, out)) == len(values) // 4
    assert pc.index_in(pa.array(["<a_999>"]), value_set=out)[0].as_py() == 999


def test_small_inputs_and_lists() -> None:
    assert string_array(["a", "b"]).to_pylist() == ["a", "b"]
    assert len(string_array(np.array([], dtype=str))) == 0
