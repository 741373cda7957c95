"""Item id -> cache row, looked up for a whole request at once.

A dict answers one id at a time. On a cache of tens of thousands of items, once a request's own
arrays (content vectors, item states) have pushed the dict out of the CPU caches, every lookup
is a chain of dependent cache misses (hash slot, entry, stored key, row object): ~0.6 us per id,
over a millisecond for 2,000 candidates. :class:`IdIndex` keeps the dict as the truth and
mirrors it in an open-addressing table of numpy arrays keyed by the ids' Python hashes (which
the request's de-duplication has already computed), so the misses of all the ids of a request
overlap instead of queueing. Every hit is verified against the stored id (a fixed-width numpy
string array), so a 64-bit hash collision can never return another item's row: a failed
verification is answered by the dict.

Writers (the cache filling itself, or appending a request's misses) hold the snapshot's lock and
publish a new table at once (copy on write); readers never lock and always see a whole table.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]

MAX_VERIFIED_LENGTH: Final = 64
"""Longest id the table stores for verification (4 bytes per character per cached item); a
cache holding a longer id answers every lookup from the dict."""
_LOAD: Final = 0.5
"""Largest share of used slots: linear probing stays at ~1.5 probes per hit."""


@dataclass(frozen=True)
class _Table:
    """One published state of the table (never modified after publication)."""

    hashes: I64  # per slot, hash(id) (meaningful where rows > 0)
    rows: I64  # per slot, the cache row (0 = empty slot)
    keys: npt.NDArray[np.str_]  # per cache row, its id ("" for row 0 and unused rows)
    used: int  # occupied slots

    @property
    def mask(self) -> int:
        return len(self.rows) - 1


def _empty(slots: int, key_rows: int, width: int) -> _Table:
    return _Table(
        hashes=np.zeros(slots, np.int64),
        rows=np.zeros(slots, np.int64),
        keys=np.zeros(key_rows, f"<U{width}"),
        used=0,
    )


def _insert(hashes: I64, rows: I64, mask: int, h: int, row: int) -> None:
    slot = h & mask
    while rows[slot]:
        slot = (slot + 1) & mask
    hashes[slot] = h
    rows[slot] = row


class IdIndex:
    """The cache's ``item_id -> row`` map (rows start at 1; 0 means absent)."""

    def __init__(self) -> None:
        self._dict: dict[str, int] = {}
        self._table: _Table | None = _empty(16, 16, 8)

    def __len__(self) -> int:
        return len(self._dict)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._dict

    def get(self, item_id: str, default: int = 0) -> int:
        """The row of one id."""
        return self._dict.get(item_id, default)

    def extend(self, ids: Sequence[str], rows: Sequence[int]) -> None:
        """Add new ids with their rows (caller holds the snapshot's write lock)."""
        new = [(i, r) for i, r in zip(ids, rows, strict=True) if i not in self._dict]
        if not new:
            return
        self._dict.update(new)
        table = self._table
        longest = max(len(i) for i, _ in new)
        if table is None or longest > MAX_VERIFIED_LENGTH:
            self._table = None  # unverifiable ids: the dict answers from now on
            return
        top = max(r for _, r in new)
        width = max(table.keys.dtype.itemsize // 4, longest)
        if top >= len(table.keys) or width > table.keys.dtype.itemsize // 4:
            keys = np.zeros(max(top + 1, 2 * len(table.keys)), f"<U{width}")
            keys[: len(table.keys)] = table.keys
        else:
            keys = table.keys.copy()
        used = table.used + len(new)
        slots = len(table.rows)
        if used > _LOAD * slots:
            while used > _LOAD * slots:
                slots *= 2
            hashes, slot_rows = np.zeros(slots, np.int64), np.zeros(slots, np.int64)
            pairs: list[tuple[str, int]] = list(self._dict.items())
        else:
            hashes, slot_rows = table.hashes.copy(), table.rows.copy()
            pairs = new
        mask = slots - 1
        for item_id, row in pairs:
            _insert(hashes, slot_rows, mask, hash(item_id), row)
        for item_id, row in new:
            keys[row] = item_id
        self._table = _Table(hashes=hashes, rows=slot_rows, keys=keys, used=used)

    def rows(self, ids: list[str]) -> I64:
        """Rows of ``ids`` in order (0 where absent)."""
        table = self._table
        n = len(ids)
        if table is None or n < 64:  # small batches: the dict is as fast
            return np.fromiter(map(self._dict.get, ids, itertools.repeat(0)), np.int64, n)
        wanted = np.fromiter(map(hash, ids), np.int64, n)
        out = np.zeros(n, np.int64)
        pending = np.arange(n)
        mask = table.mask
        slot = wanted & mask
        h = wanted
        while len(pending):
            row = table.rows[slot]
            occupied = row > 0
            hit = occupied & (table.hashes[slot] == h)
            out[pending[hit]] = row[hit]
            more = occupied & ~hit
            pending, slot, h = pending[more], (slot[more] + 1) & mask, h[more]
        found = np.flatnonzero(out)
        if len(found):
            queried = np.array(ids, dtype=np.str_)[found]
            wrong = found[table.keys[out[found]] != queried]
            for k in wrong:  # a hash collision: never another item's row
                out[k] = self._dict.get(ids[k], 0)
        return out
