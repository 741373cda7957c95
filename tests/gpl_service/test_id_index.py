"""The item id index: the numpy table agrees with a dict, collisions included."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gpl_service import id_index
from gpl_service.id_index import IdIndex


def _filled(ids: list[str], chunk: int = 700) -> IdIndex:
    index = IdIndex()
    for lo in range(0, len(ids), chunk):
        part = ids[lo : lo + chunk]
        index.extend(part, list(range(lo + 1, lo + 1 + len(part))))
    return index


def test_rows_equal_a_dict_lookup_for_known_unknown_and_repeated_ids() -> None:
    rng = random.Random(0)
    ids = [f"item-{rng.getrandbits(40):x}" for _ in range(5_000)]
    ids = list(dict.fromkeys(ids))
    index = _filled(ids)
    truth = {i: k + 1 for k, i in enumerate(ids)}
    query = rng.sample(ids, 1_500) + [f"absent-{k}" for k in range(300)] + ids[:10] + ["é✓", ""]
    rng.shuffle(query)
    got = index.rows(query)
    assert got.dtype == np.int64
    assert got.tolist() == [truth.get(i, 0) for i in query]
    assert len(index) == len(ids) and ids[7] in index and index.get("absent-1") == 0
    small = query[:5]  # the dict path for small batches gives the same answers
    assert index.rows(small).tolist() == [truth.get(i, 0) for i in small]


def test_a_hash_collision_never_returns_another_items_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Force every id onto one hash: probing finds a row, the id check must reject it."""
    ids = [f"i{k:04d}" for k in range(200)]
    monkeypatch.setattr(id_index, "hash", lambda _s: 42, raising=False)
    index = _filled(ids, chunk=64)
    query = ["i0150", "nope", "i0003", *ids[100:180]]
    assert index.rows(query).tolist() == [151, 0, 4, *range(101, 181)]


def test_appends_keep_old_rows_and_readers_keep_their_table() -> None:
    index = _filled([f"a{k}" for k in range(100)])
    before = index._table
    index.extend(["late", "a5"], [101, 999])  # a known id keeps its row
    assert before is not index._table  # published anew, never modified in place
    query = [f"a{k}" for k in range(100)] + ["late"]
    assert index.rows(query).tolist() == [*range(1, 101), 101]


def test_ids_too_long_to_verify_fall_back_to_the_dict() -> None:
    long_id = "x" * (id_index.MAX_VERIFIED_LENGTH + 1)
    index = _filled([f"a{k}" for k in range(100)])
    index.extend([long_id], [101])
    assert index._table is None
    query = [long_id, *[f"a{k}" for k in range(99)], "nope"]
    assert index.rows(query).tolist() == [101, *range(1, 100), 0]
