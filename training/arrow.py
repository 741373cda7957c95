"""Numpy -> Arrow conversions that always yield one contiguous array.

``pa.array`` splits a large numpy string array (``<U`` dtype) into a ``ChunkedArray``: with
pyarrow 26, past 1,677,721 values for ten-character strings, fewer for longer ones (it cuts by
the numpy buffer's size). Builders that take a plain ``Array`` (``ListArray.from_arrays``, the
``value_set`` of ``pc.index_in``) then fail with a ``TypeError``: anchors for 170,000 users, or a
catalog of two million items, were enough. These helpers hand back one array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pyarrow as pa


def string_array(
    values: npt.NDArray[np.str_] | npt.NDArray[np.object_] | Sequence[str],
) -> pa.StringArray:
    """``values`` as one Arrow string array, however many there are.

    Raises:
        pyarrow.ArrowInvalid: when the strings hold more than 2 GiB (Arrow's int32 offsets).
    """
    out = pa.array(values, pa.string())
    if isinstance(out, pa.ChunkedArray):
        combined = out.combine_chunks()
        assert isinstance(combined, pa.StringArray)
        return combined
    assert isinstance(out, pa.StringArray)
    return out
