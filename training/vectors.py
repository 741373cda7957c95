"""Vector helpers shared by the pipeline stages."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def l2_normalize(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Vectors along the last axis scaled to unit length, as float32; all-zero vectors stay zero.

    Dot products of the results are cosines: the SID encoder's inputs, the catalog's content
    embeddings and the interest anchors are all compared this way.
    """
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)
