"""The anchor-set lookup gives the point-in-time join's answer (``match_rows``), row for row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from training.data.contract import TIMESTAMP
from training.features.offline_store import match_rows
from training.pseudo_labels.lookup import (
    AnchorSetLookup,
    DictionaryCache,
    latest_before,
    positions_in,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _ts(values: list[datetime | None]) -> pa.Array:
    return pa.array(values, TIMESTAMP)


def _reference(rows: pa.Table, keys: pa.Table) -> np.ndarray:
    got = match_rows(rows, keys, ["user_id"], "event_timestamp", None, None)
    return np.asarray(pc.fill_null(got, -1).to_numpy(zero_copy_only=False), np.int64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lookup_equals_the_point_in_time_join(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_sets, n_rows = 60, 2_000
    users = [f"u{k}" for k in rng.integers(0, 12, n_sets)]
    days = rng.integers(0, 30, n_sets)
    days[:5] = days[5:10]  # some equal (user, cutoff) pairs: the last row must win
    users[:5] = users[5:10]
    keys = pa.table(
        {
            "user_id": users,
            "event_timestamp": _ts([T0 + timedelta(days=int(d)) for d in days]),
        }
    )
    row_users = [f"u{k}" for k in rng.integers(0, 15, n_rows)]  # u12..u14 have no sets
    row_times: list[datetime | None] = [
        T0 + timedelta(days=int(d), hours=int(h))
        for d, h in zip(rng.integers(-3, 35, n_rows), rng.integers(0, 2, n_rows), strict=True)
    ]
    row_times[:3] = [T0 + timedelta(days=int(d)) for d in days[:3]]  # exactly at a cutoff
    rows = pa.table({"user_id": row_users, "event_timestamp": _ts(row_times)})
    want = _reference(rows, keys)
    got = AnchorSetLookup.of(keys)(rows.column("user_id"), rows.column("event_timestamp"))
    np.testing.assert_array_equal(got, want)
    assert (got == -1).any() and (got >= 0).any()
    # The same ids dictionary-encoded, in chunks with their own dictionaries (as the job reads
    # parquet row groups): the same answer.
    half = n_rows // 2
    encoded = pa.chunked_array(
        [pc.dictionary_encode(pa.array(part)) for part in (row_users[:half], row_users[half:])]
    )
    got_dict = AnchorSetLookup.of(keys)(encoded, rows.column("event_timestamp"))
    np.testing.assert_array_equal(got_dict, want)


def test_nulls_and_empty_bank() -> None:
    keys = pa.table({"user_id": ["a", None], "event_timestamp": _ts([T0, T0])})
    rows = pa.table(
        {
            "user_id": ["a", "a", None, "b"],
            "event_timestamp": _ts([T0, None, T0, T0]),
        }
    )
    got = AnchorSetLookup.of(keys)(rows.column("user_id"), rows.column("event_timestamp"))
    np.testing.assert_array_equal(got, [0, -1, -1, -1])
    empty = pa.table({"user_id": pa.array([], pa.string()), "event_timestamp": _ts([])})
    got = AnchorSetLookup.of(empty)(rows.column("user_id"), rows.column("event_timestamp"))
    np.testing.assert_array_equal(got, [-1, -1, -1, -1])


def test_positions_in_plain_and_dictionary_ids_with_nulls_and_unknowns() -> None:
    value_set = pa.array(["x", "y", "z"])
    values = ["y", None, "w", "x", "y", "z", None]
    want = [1, -1, -1, 0, 1, 2, -1]
    plain = pa.array(values)
    np.testing.assert_array_equal(positions_in(plain, value_set), want)
    np.testing.assert_array_equal(positions_in(pc.dictionary_encode(plain), value_set), want)
    mixed = pa.chunked_array(
        [pc.dictionary_encode(pa.array(values[:3])), pc.dictionary_encode(pa.array(values[3:]))]
    )
    np.testing.assert_array_equal(positions_in(mixed, value_set), want)
    assert positions_in(pa.chunked_array([], pa.string()), value_set).shape == (0,)


def test_a_dictionary_seen_before_is_not_looked_up_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import training.pseudo_labels.lookup as lookup

    hashed: list[int] = []
    real = lookup._positions

    def counting(values: pa.Array, value_set: pa.Array) -> np.ndarray:
        hashed.append(len(values))
        return real(values, value_set)

    monkeypatch.setattr(lookup, "_positions", counting)
    value_set = pa.array(["x", "y", "z"])
    cache = DictionaryCache(size=2)
    first = pa.DictionaryArray.from_arrays(pa.array([0, 1, None, 1]), pa.array(["y", "w"]))
    # Equal dictionary, other buffers and indices (as in the next batch of the row group).
    again = pa.DictionaryArray.from_arrays(pa.array([1, 0]), pa.array(["y", "w"]))
    other = pa.DictionaryArray.from_arrays(pa.array([0, 1]), pa.array(["z", "x"]))
    third = pa.DictionaryArray.from_arrays(pa.array([0]), pa.array(["x"]))
    np.testing.assert_array_equal(positions_in(first, value_set, cache), [1, -1, -1, -1])
    np.testing.assert_array_equal(positions_in(again, value_set, cache), [-1, 1])
    assert hashed == [2]
    np.testing.assert_array_equal(positions_in(other, value_set, cache), [2, 0])
    np.testing.assert_array_equal(positions_in(third, value_set, cache), [0])
    assert hashed == [2, 2, 1]
    # Size 2: the first dictionary was dropped to make room for the third.
    np.testing.assert_array_equal(positions_in(again, value_set, cache), [-1, 1])
    assert hashed == [2, 2, 1, 2]
    # Without a cache nothing is remembered.
    positions_in(other, value_set)
    positions_in(other, value_set)
    assert hashed[-2:] == [2, 2]


def _latest_reference(users, times, set_users, cutoffs, count) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Per set: its user's events strictly before the cutoff by (time, position), the last few."""
    out = np.full((len(set_users), count), -1, np.int64)
    for s, (user, cut) in enumerate(zip(set_users, cutoffs, strict=True)):
        if user is None:
            continue
        before = [i for i in range(len(users)) if users[i] == user and times[i] < cut]
        before.sort(key=lambda i: (times[i], i))
        kept = before[-count:] if count else []
        if kept:
            out[s, count - len(kept) :] = kept
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("count", [1, 3, 8])
def test_latest_before_equals_a_per_set_search(seed: int, count: int) -> None:
    rng = np.random.default_rng(seed)
    pool = [f"u{i}" for i in range(12)]
    users = [None if rng.random() < 0.05 else pool[i] for i in rng.integers(0, 10, 300)]
    times = rng.integers(0, 40, 300).astype(np.int64)  # many equal times
    set_users = [None if rng.random() < 0.05 else pool[i] for i in rng.integers(0, 12, 60)]
    cutoffs = rng.integers(-2, 45, 60).astype(np.int64)  # some before every event, some at one
    got = latest_before(
        pa.chunked_array([pa.array(users[:100]), pa.array(users[100:])]),
        times,
        pa.array(set_users).dictionary_encode(),
        cutoffs,
        count,
    )
    np.testing.assert_array_equal(got, _latest_reference(users, times, set_users, cutoffs, count))


def test_latest_before_without_sets_or_events() -> None:
    none = np.zeros(0, np.int64)
    assert latest_before(
        pa.array([], pa.string()), none, pa.array(["u"]), np.array([5]), 3
    ).tolist() == [[-1, -1, -1]]
    assert latest_before(
        pa.array(["u"]), np.array([1]), pa.array([], pa.string()), none, 3
    ).shape == (0, 3)
