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
