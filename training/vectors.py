"""Vector helpers shared by the pipeline stages."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from training.threads import default_workers

#: Fewest values for which :func:`l2_normalize` splits the rows over threads: below it, starting
#: threads costs more than it saves (a 77 MB item table took 36 ms on one thread, 21 ms on two).
THREADED_FROM_VALUES = 1 << 22


def l2_normalize(
    x: npt.NDArray[np.floating], workers: int | None = None
) -> npt.NDArray[np.float32]:
    """Vectors along the last axis scaled to unit length, as float32; all-zero vectors stay zero.

    Dot products of the results are cosines: the SID encoder's inputs, the catalog's content
    embeddings and the interest anchors are all compared this way.

    Args:
        x: Vectors along the last axis, any leading shape.
        workers: Threads for large inputs (default: one per core). Each vector is normalized the
            same way whichever thread does it, so the result does not depend on this.
    """
    workers = workers or default_workers()
    if x.size < THREADED_FROM_VALUES or workers == 1 or x.ndim == 0:
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
        return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty(rows.shape, np.float32)

    def part(first: int, last: int) -> None:
        # numpy's reductions and divisions release the GIL on arrays this size.
        block = rows[first:last]
        norms = np.linalg.norm(block, axis=-1, keepdims=True)
        np.divide(block, np.where(norms > 0, norms, 1.0), out=out[first:last], casting="unsafe")

    cuts = np.linspace(0, len(rows), workers + 1).astype(int).tolist()
    with ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(part, a, b) for a, b in itertools.pairwise(cuts)]:
            done.result()
    return out.reshape(x.shape)


#: How far from 1 a vector's length may be for :func:`as_unit` to take it as already normalized
#: (float32 rounding of a normalized vector stays within ~1e-7 of 1).
UNIT_TOLERANCE = 1e-5


def as_unit(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """``x`` itself when its vectors already have unit length (or are all zero), else normalized.

    The pipeline writes its content embeddings and anchors normalized, so a stage that reads
    them gets them back without a copy: no second table of the catalog's size in memory, and no
    time spent writing it (fresh memory is slow to touch: normalizing a 61 MB table took ~110 ms
    in a new process against ~15 ms in a warm one). The check allocates one float per vector.
    """
    if x.dtype == np.float32 and x.flags.c_contiguous and x.ndim >= 1 and x.size:
        rows = x.reshape(-1, x.shape[-1])
        squared = np.einsum("ij,ij->i", rows, rows)
        if bool(np.all((np.abs(squared - 1.0) <= 2 * UNIT_TOLERANCE) | (squared == 0.0))):
            return x
    return l2_normalize(x)
