"""Compiling numeric loops with numba, cached on disk where possible.

The pseudo-label job's hot loops (the relevance kernel, its counting sort, the anchor sets'
point-in-time search) are plain Python loops over numpy arrays compiled to machine code; they
release the GIL so the job's threads can run them on every core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

F = TypeVar("F", bound=Callable[..., Any])

# Only reassociation and contraction are allowed (to vectorize the sums into fused multiply-adds);
# "no infinities" must not be, since a running maximum starts at -inf.
JIT_OPTIONS: dict[str, Any] = {"nogil": True, "fastmath": {"reassoc", "contract"}}


def compiled(func: F) -> F:
    """``func`` compiled by numba, its machine code cached on disk where numba can write.

    numba caches next to the module (``__pycache__``) or under the user's cache directory
    (``NUMBA_CACHE_DIR`` sets it). A read-only install without a writable home has neither, and
    ``cache=True`` then fails at import; such a process compiles once in memory instead.
    """
    try:
        return cast(F, numba.njit(cache=True, **JIT_OPTIONS)(func))
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return cast(F, numba.njit(cache=False, **JIT_OPTIONS)(func))
