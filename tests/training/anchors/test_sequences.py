from __future__ import annotations

from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest

from tests.training.anchors.conftest import T0, TS
from training.anchors.sequences import (
    ExampleSet,
    anchor_requests,
    day_cutoffs,
    downsample,
    frequency_summary,
    holdout_split,
    keep_probabilities,
    request_cutoffs,
    user_sequences,
    with_reversed,
)
from training.data.contract import ContractError

CATALOG = np.array([f"i{i}" for i in range(10)])


def positives(rows: list[tuple[str, str, int]]) -> pa.Table:
    """rows of (user, item, hours after T0)."""
    return pa.table(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_timestamp": pa.array([T0 + timedelta(hours=r[2]) for r in rows], TS),
        }
    )


def test_user_sequences_are_chronological_and_drop_unknown_items() -> None:
    table = positives(
        [("u1", "i3", 5), ("u0", "i1", 2), ("u1", "i2", 1), ("u0", "zz", 3), ("u0", "i0", 1)]
    )
    seqs = user_sequences(table, CATALOG)
    assert seqs.user_ids.tolist() == ["u0", "u1"]
    assert [s.tolist() for s in seqs.sequences()] == [[0, 1], [2, 3]]
    assert seqs.dropped_unknown_items == 1


def test_user_sequences_match_a_sort_of_the_rows() -> None:
    """Random rows over several Arrow chunks: users in code-point order (ids of every length and
    script), each user's items by time with ties in input order, a user whose only items are
    unknown absent."""
    rng = np.random.default_rng(3)
    names = ["b", "a", "a" * 40, "é", "ü2", "Z", "user-10", "user-9", "日本", "only-unknown"]
    rows = []
    for _ in range(400):
        user = names[int(rng.integers(len(names) - 1))]
        rows.append((user, f"i{int(rng.integers(10))}", int(rng.integers(6))))  # time ties
    rows += [("only-unknown", "zz", 1), ("b", "zz", 2)]
    table = positives(rows)
    table = pa.concat_tables([table.slice(0, 150), table.slice(150)])
    assert table.column("user_id").num_chunks == 2
    seqs = user_sequences(table, CATALOG)
    known = [(u, int(i[1:]), h, k) for k, (u, i, h) in enumerate(rows) if i != "zz"]
    expected = {
        u: [r[1] for r in sorted((r for r in known if r[0] == u), key=lambda r: (r[2], r[3]))]
        for u, *_ in known
    }
    assert seqs.user_ids.tolist() == sorted(expected)
    assert [s.tolist() for s in seqs.sequences()] == [expected[u] for u in sorted(expected)]
    assert seqs.dropped_unknown_items == 2


def test_user_sequences_validate_the_contract() -> None:
    bad = pa.table(
        {"user_id": ["u"], "item_id": ["i0"], "event_timestamp": pa.array([1], pa.int64())}
    )
    with pytest.raises(ContractError):
        user_sequences(bad, CATALOG)


def test_cutoffs_never_use_history_at_or_after_the_cutoff() -> None:
    rng = np.random.default_rng(1)
    rows = [
        (f"u{rng.integers(8)}", f"i{rng.integers(10)}", int(rng.integers(0, 24 * 6)))
        for _ in range(300)
    ]
    # Positives exactly at a cutoff instant must not be used by that cutoff.
    rows += [("u0", "i9", 48), ("u1", "i8", 72)]
    table = positives(rows)
    seqs = user_sequences(table, CATALOG)
    cutoffs = [T0 + timedelta(days=d) for d in (1, 2, 3, 4, 5)]
    req = anchor_requests(seqs, cutoffs, max_history=1000)
    users = table.column("user_id").to_pylist()
    items = [int(i[1:]) for i in table.column("item_id").to_pylist()]
    hours = [r[2] for r in rows]
    for user, cut, hist in zip(req.user_ids, req.cutoffs, req.histories, strict=True):
        cut_h = (cut - int(T0.timestamp() * 1e6)) / 3.6e9
        expected = sorted(
            (h, i) for u, i, h in zip(users, items, hours, strict=True) if u == user and h < cut_h
        )
        assert sorted(hist.tolist()) == sorted(i for _, i in expected)
        assert all(h < cut_h for h, _ in expected)


def test_one_anchor_set_per_changed_history_and_empty_users_counted() -> None:
    table = positives(
        [
            ("a", "i1", 1),  # day 0
            ("a", "i2", 30),  # day 1
            ("b", "i3", 50),  # day 2: empty at the first cutoff
            ("c", "i4", 24 * 9),  # after every cutoff
        ]
    )
    seqs = user_sequences(table, CATALOG)
    cutoffs = [T0 + timedelta(days=d) for d in (1, 2, 3, 4)]
    req = anchor_requests(seqs, cutoffs, max_history=10, users=["a", "b", "c", "ghost"])
    got = [
        (u, int((c - int(T0.timestamp() * 1e6)) // 86_400_000_000), h.tolist())
        for u, c, h in zip(req.user_ids, req.cutoffs, req.histories, strict=True)
    ]
    # a: changes at day 1 (i1) and day 2 (i2); b: at day 3; nothing at day 4 (unchanged).
    assert got == [("a", 1, [1]), ("a", 2, [1, 2]), ("b", 3, [3])]
    # b and c are empty at the first cutoff, ghost has no positive at all.
    assert req.skipped_empty_history == 3


def test_histories_are_truncated_to_the_most_recent_items() -> None:
    table = positives([("a", f"i{i}", i) for i in range(8)])
    req = anchor_requests(user_sequences(table, CATALOG), [T0 + timedelta(days=1)], max_history=3)
    assert [h.tolist() for h in req.histories] == [[5, 6, 7]]


def test_request_cutoffs_see_same_day_history_that_day_cutoffs_miss() -> None:
    # One session: a rates i1, i2 at hours 1 and 2; requests at hours 2 and 3 the same day.
    table = positives([("a", "i1", 1), ("a", "i2", 2)])
    seqs = user_sequences(table, CATALOG)
    req_users = pa.array(["a", "a", "a"])
    req_ts = pa.array([T0 + timedelta(hours=h) for h in (2, 3, 3)], TS)
    by_day = anchor_requests(seqs, day_cutoffs(req_ts), max_history=10)
    assert by_day.user_ids == [] and by_day.skipped_empty_history == 1
    by_request = anchor_requests(seqs, request_cutoffs(req_users, req_ts), max_history=10)
    hours = [(c - int(T0.timestamp() * 1e6)) // 3_600_000_000 for c in by_request.cutoffs]
    assert hours == [2, 3]
    assert [h.tolist() for h in by_request.histories] == [[1], [1, 2]]


def test_per_user_cutoffs_match_the_shared_path_user_by_user() -> None:
    rng = np.random.default_rng(3)
    rows = [
        (f"u{rng.integers(12)}", f"i{rng.integers(10)}", int(rng.integers(0, 24 * 8)))
        for _ in range(400)
    ]
    table = positives(rows)
    seqs = user_sequences(table, CATALOG)
    # Requests of 14 users (two without any positive), some at the same instant as a positive.
    req_users = [f"u{rng.integers(14)}" for _ in range(90)] + ["u0"]
    req_hours = [int(rng.integers(0, 24 * 9)) for _ in range(90)] + [rows[0][2]]
    uc = request_cutoffs(
        pa.array(req_users), pa.array([T0 + timedelta(hours=h) for h in req_hours], TS)
    )
    got = anchor_requests(seqs, uc, max_history=4, users=[f"u{u}" for u in range(13)])
    expected_sets: list[tuple[str, int, list[int]]] = []
    skipped = 0
    for user in sorted(set(req_users) - {"u13"}):
        hours = sorted({h for u, h in zip(req_users, req_hours, strict=True) if u == user})
        one = anchor_requests(
            seqs, [T0 + timedelta(hours=h) for h in hours], max_history=4, users=[user]
        )
        skipped += one.skipped_empty_history
        expected_sets += [
            (u, int(c), h.tolist())
            for u, c, h in zip(one.user_ids, one.cutoffs, one.histories, strict=True)
        ]
    assert [
        (u, int(c), h.tolist())
        for u, c, h in zip(got.user_ids, got.cutoffs, got.histories, strict=True)
    ] == expected_sets
    assert got.skipped_empty_history == skipped
    assert len(expected_sets) > 20


def test_day_cutoffs_are_distinct_utc_midnights() -> None:
    ts = pa.array([T0 + timedelta(hours=h) for h in (1, 5, 30, 49, 50)], TS)
    assert day_cutoffs(ts) == [T0, T0 + timedelta(days=1), T0 + timedelta(days=2)]


def test_downsampling_formula() -> None:
    counts = np.array([1000, 100, 10, 1, 0])
    total = counts.sum()
    prob = keep_probabilities(counts, threshold=0.01, alpha=0.5)
    expected = np.minimum(1.0, (0.01 / (counts[:4] / total)) ** 0.5)
    np.testing.assert_allclose(prob[:4], expected)
    assert prob[4] == 1.0
    assert prob[0] == pytest.approx((0.01 * total / 1000) ** 0.5)
    assert prob[3] == 1.0  # rare items are always kept


def test_downsampling_keeps_the_expected_share_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.choice(10, size=50, p=[0.5] + [0.5 / 9] * 9) for _ in range(200)]
    a = downsample(seqs, 10, threshold=0.05, alpha=0.5, seed=3)
    b = downsample(seqs, 10, threshold=0.05, alpha=0.5, seed=3)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    flat_before = np.concatenate(seqs)
    flat_after = np.concatenate(a)
    share0 = (flat_before == 0).mean()
    kept0 = (flat_after == 0).sum() / (flat_before == 0).sum()
    assert kept0 == pytest.approx((0.05 / share0) ** 0.5, abs=0.03)
    assert (
        frequency_summary(a, 10)["max_item_share"] < frequency_summary(seqs, 10)["max_item_share"]
    )


def test_holdout_and_examples() -> None:
    table = positives([("a", f"i{i}", i) for i in range(5)] + [("b", "i9", 1)])
    seqs = user_sequences(table, CATALOG)
    train, ev = holdout_split(seqs, eval_users=5, max_history=2, seed=0)
    assert [s.tolist() for s in train] == [[0, 1, 2, 3], [9]]  # b has one positive: not held out
    assert [h.tolist() for h in ev.histories] == [[2, 3]] and ev.targets.tolist() == [4]
    ex = ExampleSet.build(train, max_history=2, loss_on="target")
    spans = [
        (ex.items[s:e].tolist(), ex.items[ls:e].tolist())
        for s, e, ls in zip(ex.start, ex.end, ex.loss_start, strict=True)
    ]
    assert spans == [([0, 1], [1]), ([0, 1, 2], [2]), ([1, 2, 3], [3])]
    ex_all = ExampleSet.build(train, max_history=2, loss_on="all")
    spans = [ex_all.items[s:e].tolist() for s, e in zip(ex_all.start, ex_all.end, strict=True)]
    assert spans == [[1, 2, 3], [0], [9]]
    assert (ex_all.loss_start == ex_all.start).all()
    # Every example knows its whole sequence (what a prior fused into training must leave out).
    for e in (ex, ex_all):
        assert e.seq_start is not None and e.seq_end is not None
        whole = [e.items[s:t].tolist() for s, t in zip(e.seq_start, e.seq_end, strict=True)]
        assert all(seq in [s.tolist() for s in train] for seq in whole)
        assert (e.seq_start <= e.start).all() and (e.end <= e.seq_end).all()


def test_reverse_augmentation_appends_each_sequence_backwards() -> None:
    seqs = [np.array([0, 1, 2]), np.array([5]), np.array([3, 4])]
    out = with_reversed(seqs)
    assert [s.tolist() for s in out] == [[0, 1, 2], [5], [3, 4], [2, 1, 0], [4, 3]]
    out[3][0] = 9  # copies, not views of the originals
    assert seqs[0].tolist() == [0, 1, 2]
