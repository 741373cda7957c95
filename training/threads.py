"""Thread counts: the cores this process may use, and scoped torch CPU thread counts.

:func:`default_workers` sizes the numpy/numba thread pools of the pseudo-label job (torch is
imported only by :func:`torch_threads`, so those stages do not pay for loading it).

Multi-threaded CPU matrix products (MKL's GEMM under torch) are not bit-for-bit reproducible from
run to run: how the work is split between threads changes the order of the floating-point sums,
so the last bits of a result can differ between two runs of the same code on the same machine.
A single pass (text vectors) only moves in those last bits; training carries them further (two
demo runs' pre-rankers differed by 0.004 AUC: ``training.threads: 1`` makes them identical). A
stage that makes discrete choices from near-ties turns them into different outputs at once: the
SID quantizer does
(six runs of the SID stage on MovieLens-100k gave two different code sets with two threads, one
with one thread), so it runs inside :func:`torch_threads` with one thread by default. The anchor
LM's beam search could flip near-tied anchors the same way, but its CPU training is where the
cores pay most, so it keeps them (GPU runs are the intended path there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def default_workers() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the body with ``count`` torch intra-op threads (``None``: leave it unchanged).

    The previous count is restored on exit, also when the body raises.
    """
    if count is None:
        yield
        return
    if count < 1:
        raise ValueError(f"thread count must be >= 1, got {count}")
    import torch  # here, not at the top: most users of this module need no torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
