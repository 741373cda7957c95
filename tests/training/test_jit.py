"""numba compilation: cached on disk where numba can write, in memory where it cannot."""

from __future__ import annotations

from numba.core.caching import NullCache

from training.jit import compiled


def test_compiles_where_numba_cannot_cache() -> None:
    """A function numba has no cache location for (here: no source file) still compiles."""
    namespace: dict[str, object] = {}
    # Defined from a string: no source file, so numba has nowhere to cache it.
    exec("def plus_one(x):\n    return x + 1\n", namespace)
    function = compiled(namespace["plus_one"])  # type: ignore[arg-type]
    assert function(41) == 42
    assert isinstance(function._cache, NullCache)  # compiled in memory only


def _double(x: int) -> int:
    return 2 * x


def test_caches_on_disk_where_it_can() -> None:
    function = compiled(_double)
    assert function(21) == 42
    assert not isinstance(function._cache, NullCache)
