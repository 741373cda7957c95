"""Point-in-time lookup of anchor sets: each request row's latest set with cutoff <= its time.

The same answer as :func:`training.features.offline_store.match_rows` on ``(user_id,
event_timestamp)`` (equal cutoffs: the last row wins), without a DuckDB join per batch: the sets
are sorted once by (user, cutoff), and each batch is one hashed id lookup (Arrow) plus a
compiled binary search within each row's user range.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from training.data.contract import TIMESTAMP
from training.jit import compiled

I64 = npt.NDArray[np.int64]
Column: TypeAlias = pa.Array | pa.ChunkedArray


def positions_in(column: Column, value_set: pa.Array, cache: DictionaryCache | None = None) -> I64:
    """Position of each value of ``column`` in ``value_set`` (-1: absent or null).

    Dictionary-encoded chunks (the job reads its id columns that way) are looked up once per
    distinct value, then spread by their indices: hashing a few thousand dictionary strings
    instead of every row's string. With a ``cache`` (kept by the caller for one ``value_set``),
    a dictionary already seen is not hashed again: every batch read from one parquet row group
    carries the same dictionary, in both of the job's passes.
    """
    out: list[I64] = []
    for chunk in _chunks(column):
        if pa.types.is_dictionary(chunk.type):
            known = cache.get(chunk.dictionary) if cache is not None else None
            if known is None:
                known = _positions(chunk.dictionary, value_set)
                if cache is not None:
                    cache.put(chunk.dictionary, known)
            indices = pc.fill_null(chunk.indices, -1).to_numpy(zero_copy_only=False)
            # A trailing -1 answers the null indices (index -1 picks it).
            out.append(np.append(known, -1)[indices])
        else:
            out.append(_positions(chunk, value_set))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class DictionaryCache:
    """The positions of the last few dictionaries looked up against one value set.

    A hit costs one comparison of the dictionaries (their buffers), far less than hashing their
    strings again (~5 ms for 46,000 item ids).
    """

    def __init__(self, size: int = 4) -> None:
        self._entries: deque[tuple[pa.Array, I64]] = deque(maxlen=size)

    def get(self, dictionary: pa.Array) -> I64 | None:
        """The positions of an equal dictionary seen before, else None."""
        for seen, positions in self._entries:
            if len(seen) == len(dictionary) and seen.equals(dictionary):
                return positions
        return None

    def put(self, dictionary: pa.Array, positions: I64) -> None:
        """Remember ``positions`` for ``dictionary`` (the oldest entry goes when full)."""
        self._entries.append((dictionary, positions))


def _chunks(column: Column) -> list[pa.Array]:
    return list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]


def _positions(values: pa.Array, value_set: pa.Array) -> I64:
    found = pc.fill_null(pc.index_in(values, value_set=value_set), -1)
    return found.to_numpy(zero_copy_only=False).astype(np.int64)


def _micros(column: Column) -> tuple[I64, npt.NDArray[np.bool_]]:
    """Timestamps as int64 microseconds (UTC) and which are present."""
    # Finer units (a log written in ns) are truncated to microseconds, the contract's unit.
    ts = pc.cast(column, TIMESTAMP, safe=False).cast(pa.int64())
    present = pc.is_valid(ts).to_numpy(zero_copy_only=False)
    return pc.fill_null(ts, 0).to_numpy(zero_copy_only=False).astype(np.int64), present


@dataclass(frozen=True)
class AnchorSetLookup:
    """Anchor sets sorted by (user, cutoff), ready for per-batch point-in-time lookups.

    Attributes:
        users: Distinct user ids of the sets (Arrow value set).
        start: Per user (position in ``users``), first sorted position of its sets.
        end: Per user, one past its last sorted position.
        cutoffs: Cutoff (microseconds) per sorted position, ascending within each user.
        rows: Original set index per sorted position.
    """

    users: pa.Array
    start: I64
    end: I64
    cutoffs: I64
    rows: I64
    user_cache: DictionaryCache = field(default_factory=DictionaryCache, compare=False, repr=False)

    @classmethod
    def of(cls, keys: pa.Table) -> AnchorSetLookup:
        """From the sets' ``user_id`` and ``event_timestamp`` (cutoff) columns, in set order."""
        user = keys.column("user_id").combine_chunks()
        cutoffs, has_cutoff = _micros(keys.column("event_timestamp"))
        usable = has_cutoff & pc.is_valid(user).to_numpy(zero_copy_only=False)
        encoded = pc.dictionary_encode(user)
        codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        index = np.flatnonzero(usable)
        # Sorted by user, cutoff, then set row: among equal cutoffs the last row is found last.
        order = index[np.lexsort((index, cutoffs[index], codes[index]))]
        sorted_codes = codes[order]
        n_users = len(encoded.dictionary)
        every = np.arange(n_users)
        return cls(
            users=encoded.dictionary,
            start=np.searchsorted(sorted_codes, every, side="left").astype(np.int64),
            end=np.searchsorted(sorted_codes, every, side="right").astype(np.int64),
            cutoffs=cutoffs[order],
            rows=order.astype(np.int64),
        )

    def __call__(self, user_ids: Column, timestamps: Column) -> I64:
        """Set index of each row (-1: unknown user, no set at or before its time, or nulls)."""
        codes = positions_in(user_ids, self.users, self.user_cache)
        t, present = _micros(timestamps)
        out = np.empty(len(codes), np.int64)
        _search(codes, t, present, self.start, self.end, self.cutoffs, self.rows, out)
        return out


@compiled
def _search(
    codes: I64,
    t: I64,
    present: npt.NDArray[np.bool_],
    start: I64,
    end: I64,
    cutoffs: I64,
    rows: I64,
    out: I64,
) -> None:  # pragma: no cover - compiled; covered through AnchorSetLookup
    # A binary search per row within its user's sets for the first cutoff after t; the set just
    # before it is the latest at or before t (one compiled loop: the same search as whole-array
    # numpy passes took ~6 passes per halving, 17 ms for 500k rows with one set per user).
    for r in range(codes.shape[0]):
        code = codes[r]
        if code < 0 or not present[r]:
            out[r] = -1
            continue
        lo = start[code]
        hi = end[code]
        first = lo
        while lo < hi:
            mid = (lo + hi) // 2
            if cutoffs[mid] > t[r]:
                hi = mid
            else:
                lo = mid + 1
        out[r] = rows[lo - 1] if lo > first else -1


def latest_before(
    event_users: Column,
    event_times: I64,
    set_users: Column,
    set_cutoffs: I64,
    count: int,
) -> I64:
    """For each set, the positions of its user's latest ``count`` events strictly before its cutoff.

    Args:
        event_users: User of each event (e.g. each positive interaction).
        event_times: Event times, int64 microseconds.
        set_users: User of each set.
        set_cutoffs: Set cutoffs, int64 microseconds.
        count: Events kept per set (the most recent ones).

    Returns:
        ``[sets, count]`` positions into the event arrays, oldest first and right-aligned: a set
        with fewer earlier events has -1 in its leading slots. Events at exactly the cutoff are
        not before it.

    One sort of events and sets together by (user, time), sets ahead of events at equal times:
    the events counted before a set in that order are its user's events before its cutoff, so
    no per-set binary search (or Python loop) is needed.
    """
    n_events, n_sets = len(event_times), len(set_cutoffs)
    out = np.full((n_sets, count), -1, np.int64)
    if n_sets == 0 or count == 0:
        return out
    ids = pa.chunked_array(
        [
            *_chunks(event_users.cast(pa.string())),
            *_chunks(set_users.cast(pa.string())),
        ],
        type=pa.string(),
    )
    codes = pc.fill_null(ids.combine_chunks().dictionary_encode().indices, -1)
    user = codes.to_numpy(zero_copy_only=False).astype(np.int64)
    times = np.concatenate([event_times, set_cutoffs]).astype(np.int64)
    is_event = np.concatenate([np.ones(n_events, np.int8), np.zeros(n_sets, np.int8)])
    order = np.lexsort((is_event, times, user))
    merged_is_event = is_event[order]
    events_before = np.cumsum(merged_is_event) - merged_is_event  # events strictly before
    set_pos = np.empty(n_sets, np.int64)
    rank_of_set = order[merged_is_event == 0] - n_events  # which set sits at each set slot
    set_pos[rank_of_set] = events_before[merged_is_event == 0]
    # The events in merged order are sorted by (user, time): their k-th is event ``ev_order[k]``.
    ev_order = order[merged_is_event == 1]
    ev_user = user[ev_order]
    user_first = np.searchsorted(ev_user, user[n_events:], side="left")
    window = set_pos[:, None] - count + np.arange(count)[None, :]
    valid = window >= user_first[:, None]
    # Null users match nobody (not even other null users).
    valid &= (user[n_events:] >= 0)[:, None]
    out[valid] = ev_order[window[valid]]
    return out
