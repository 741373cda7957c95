"""SID codes and tokens: formatting, parsing, collisions and disambiguation."""

from __future__ import annotations

import numpy as np
import pytest

from training.sids.ids import (
    collision_rate,
    disambiguate,
    format_sid,
    format_sids,
    next_free_indices,
    parse_sid,
    shared_prefix_rate,
    taken_last_codes,
    unique_last_level,
)


def test_format_and_parse_round_trip() -> None:
    assert format_sid([12, 7, 201, 0]) == "<a_12><b_7><c_201><d_0>"
    assert parse_sid("<a_12><b_7><c_201><d_0>") == [12, 7, 201, 0]
    assert format_sids(np.array([[1, 2], [3, 4]])) == ["<a_1><b_2>", "<a_3><b_4>"]


@pytest.mark.parametrize("bad", ["", "<a_1><c_2>", "<b_1>", "<a_1>x", "<a_-1>", "a_1"])
def test_parse_refuses_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_sid(bad)


def test_disambiguation_orders_by_item_id_not_row_order() -> None:
    prefix = np.array([[1, 2], [0, 0], [1, 2], [1, 2]])
    ids = ["c", "z", "a", "b"]
    index = disambiguate(prefix, ids)
    assert index.tolist() == [2, 0, 0, 1]
    # Same rows shuffled: each item keeps its index.
    perm = [3, 1, 0, 2]
    again = disambiguate(prefix[perm], [ids[k] for k in perm])
    assert again.tolist() == [index[k] for k in perm]
    full = np.column_stack([prefix, index])
    assert len({tuple(r) for r in full.tolist()}) == len(ids)


def test_disambiguation_continues_after_taken_indices() -> None:
    existing = np.array([[1, 2, 0], [1, 2, 1], [5, 5, 0]])
    free = next_free_indices(existing)
    assert free == {(1, 2): 2, (5, 5): 1}
    new = disambiguate(np.array([[1, 2], [7, 7], [1, 2]]), ["y", "n", "x"], free)
    assert new.tolist() == [3, 0, 2]


def test_collision_rate_counts_items_beyond_the_first_of_each_prefix() -> None:
    prefix = np.array([[0, 1], [0, 1], [0, 1], [2, 2]])
    assert collision_rate(prefix) == pytest.approx(0.5)
    assert collision_rate(np.zeros((0, 2), dtype=int)) == 0.0


def test_shared_prefix_rate_counts_every_item_of_a_shared_prefix() -> None:
    prefix = np.array([[0, 1], [0, 1], [0, 1], [2, 2]])
    assert shared_prefix_rate(prefix) == pytest.approx(0.75)
    assert shared_prefix_rate(np.zeros((0, 2), dtype=int)) == 0.0


# Last-level codewords on a line: code c sits at x = c.
BOOK = np.arange(4, dtype=np.float32)[:, None]


def test_unique_last_level_matches_colliding_items_to_nearest_free_codes() -> None:
    # a and b share level 1 and their nearest last code (1); c is alone in another group.
    codes = np.array([[0, 1], [0, 1], [5, 1]])
    residual = np.array([[1.1], [1.4], [1.0]], dtype=np.float32)
    ids = ["a", "b", "c"]
    out = unique_last_level(codes, residual, BOOK, ids)
    # a is closer to 1 and keeps it; b moves to its next-nearest code 2; c is untouched.
    assert out.tolist() == [[0, 1], [0, 2], [5, 1]]
    perm = [2, 0, 1]
    again = unique_last_level(codes[perm], residual[perm], BOOK, [ids[k] for k in perm])
    assert again.tolist() == [out[k].tolist() for k in perm]


def test_unique_last_level_breaks_exact_ties_by_item_id_and_avoids_taken_codes() -> None:
    codes = np.array([[0, 1], [0, 1]])
    residual = np.array([[1.0], [1.0]], dtype=np.float32)
    out = unique_last_level(codes, residual, BOOK, ["y", "x"])
    assert len({tuple(r) for r in out.tolist()}) == 2
    assert (
        out.tolist()
        == unique_last_level(codes[::-1], residual[::-1], BOOK, ["x", "y"])[::-1].tolist()
    )
    # Existing SIDs hold codes 1 and 2 in group (0,): a new item at 1.2 gets the nearest free
    # code, 0 (3 is farther); the item of group (7,) keeps its nearest code, which is free.
    taken = taken_last_codes(np.array([[0, 1, 0], [0, 2, 0], [7, 3, 0]]))
    assert taken == {(0,): {1, 2}, (7,): {3}}
    new = unique_last_level(
        np.array([[0, 1], [7, 0]]), np.array([[1.2], [0.0]]), BOOK, ["n", "m"], taken
    )
    assert new.tolist() == [[0, 0], [7, 0]]


def test_unique_last_level_leaves_overflow_to_disambiguation() -> None:
    # Six identical items, four codes: four get distinct codes, two keep their nearest code.
    codes = np.zeros((6, 2), dtype=np.int32)
    residual = np.zeros((6, 1), dtype=np.float32)
    ids = [f"i{k}" for k in range(6)]
    out = unique_last_level(codes, residual, BOOK, ids)
    assert sorted(set(out[:, 1].tolist())) == [0, 1, 2, 3]
    index = disambiguate(out, ids)
    full = np.column_stack([out, index])
    assert len({tuple(r) for r in full.tolist()}) == 6
    assert int(index.max()) == 2  # three items ended on code 0
    with pytest.raises(ValueError, match="two levels"):
        unique_last_level(codes[:, :1], residual, BOOK, ids)
