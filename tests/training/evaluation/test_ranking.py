from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest

from training.evaluation.metrics import auc, grouped_auc
from training.evaluation.ranking import (
    EvaluationError,
    ItemInfo,
    evaluate_scores,
    long_tail_mask,
)

Row = tuple[str, str, str, str, float]  # request_id, user_id, item_id, stage, score


def scored_table(rows: list[Row]) -> pa.Table:
    request_id, user_id, item_id, stage, score = zip(*rows, strict=True)
    return pa.table(
        {
            "request_id": list(request_id),
            "user_id": list(user_id),
            "item_id": list(item_id),
            "stage": list(stage),
            "score": pa.array(score, pa.float64()),
        }
    )


def truth_table(rows: list[tuple[str, str, int]], request_ids: list[str] | None = None) -> pa.Table:
    user_id, item_id, label = zip(*rows, strict=True)
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(user_id, pa.string()),
        "item_id": pa.array(item_id, pa.string()),
        "label": pa.array(label, pa.int8()),
    }
    if request_ids is not None:
        columns["request_id"] = pa.array(request_ids, pa.string())
    return pa.table(columns)


def item_info(
    ids: str = "abcde",
    embeddings: list[list[float]] | None = None,
    categories: list[str] | None = None,
    popularity: list[float] | None = None,
) -> ItemInfo:
    n = len(ids)
    return ItemInfo(
        item_ids=np.array(list(ids), dtype=object),
        embeddings=np.asarray(embeddings if embeddings is not None else np.eye(n), np.float32),
        categories=np.array(categories if categories is not None else [""] * n, dtype=object),
        popularity=np.asarray(popularity if popularity is not None else [0.0] * n),
    )


# r1 ranks a, b, c, d, e: b and c tie at 0.8 and item_id puts b first (rows list c first).
HAND_ROWS: list[Row] = [
    ("r1", "u1", "a", "exposed", 0.9),
    ("r1", "u1", "c", "ranked", 0.8),
    ("r1", "u1", "b", "exposed", 0.8),
    ("r1", "u1", "d", "retrieved", 0.5),
    ("r1", "u1", "e", "retrieved", 0.1),
    ("r2", "u2", "a", "exposed", 0.3),
    ("r2", "u2", "b", "retrieved", 0.2),
    ("r2", "u2", "c", "preranked", 0.1),
    ("r3", "u3", "a", "exposed", 0.7),
    ("r3", "u3", "b", "exposed", 0.6),
]
HAND_TRUTH = [("u1", "c", 1), ("u1", "e", 1), ("u2", "a", 1), ("u1", "a", 0)]


def test_hand_computed_hr_recall_ndcg_with_ties_and_a_request_without_positives() -> None:
    m = evaluate_scores(scored_table(HAND_ROWS), truth_table(HAND_TRUTH), item_info(), ks=(2, 3))
    # r1: positives c (rank 3 after the tie) and e (rank 5); r2: a at rank 1; r3: none.
    assert m["hr@2"] == pytest.approx(0.5)
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx(0.5)
    assert m["hr@3"] == pytest.approx(1.0)
    assert m["recall@3"] == pytest.approx((0.5 + 1.0) / 2)
    ndcg_r1 = (1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["ndcg@3"] == pytest.approx((ndcg_r1 + 1.0) / 2)
    assert m["requests_evaluated"] == 2
    assert m["rows"] == 10
    assert m["positives"] == 3
    assert m["truth_coverage"] == pytest.approx(0.4)  # r1: a, c, e; r2: a
    labels = np.array([0, 1, 0, 0, 1, 1, 0, 0, 0, 0])
    scores = np.array([r[4] for r in HAND_ROWS])
    assert m["auc"] == pytest.approx(auc(labels, scores))
    groups = np.array([r[0] for r in HAND_ROWS], dtype=object)
    assert m["gauc"] == pytest.approx(grouped_auc(groups, labels, scores))
    assert m["gauc"] == pytest.approx((5 * 1.5 / 6 + 3 * 1.0) / 8)  # r1: 1.5 of 6 pairs (one tie)


def test_unexposed_metrics_rank_unexposed_candidates_among_themselves() -> None:
    rows: list[Row] = [
        ("r1", "u1", "a", "exposed", 0.9),
        ("r1", "u1", "b", "retrieved", 0.8),
        ("r1", "u1", "c", "preranked", 0.7),
        ("r1", "u1", "d", "ranked", 0.6),
        ("r2", "u2", "e", "exposed", 0.5),
    ]
    truth = [("u1", "a", 1), ("u1", "c", 1), ("u1", "b", 0), ("u2", "e", 1)]
    m = evaluate_scores(scored_table(rows), truth_table(truth), item_info(), ks=(1, 2))
    assert m["hr@1"] == 1.0
    assert m["recall@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["requests_evaluated"] == 2
    # Without a and e: r1 is b, c, d with c at rank 2; r2 has no rows left.
    assert m["unexposed_hr@1"] == 0.0
    assert m["unexposed_recall@1"] == 0.0
    assert m["unexposed_hr@2"] == 1.0
    assert m["unexposed_recall@2"] == 1.0
    assert m["unexposed_ndcg@2"] == pytest.approx(1 / math.log2(3))
    assert m["unexposed_auc"] == pytest.approx(0.5)
    assert m["unexposed_gauc"] == pytest.approx(0.5)
    assert m["unexposed_rows"] == 3
    assert m["unexposed_positives"] == 1
    assert m["unexposed_requests_evaluated"] == 1


def test_unexposed_metrics_are_nan_when_every_row_is_exposed() -> None:
    rows: list[Row] = [("r1", "u1", "a", "exposed", 0.9), ("r1", "u1", "b", "exposed", 0.1)]
    m = evaluate_scores(scored_table(rows), truth_table([("u1", "a", 1)]), item_info(), ks=(1,))
    assert m["hr@1"] == 1.0
    assert math.isnan(m["unexposed_hr@1"])
    assert math.isnan(m["unexposed_auc"])
    assert m["unexposed_rows"] == 0


def test_join_by_request_id_versus_user_id() -> None:
    rows: list[Row] = [
        ("r1", "u1", "a", "exposed", 0.9),
        ("r1", "u1", "b", "exposed", 0.1),
        ("r2", "u1", "a", "exposed", 0.9),
        ("r2", "u1", "b", "exposed", 0.1),
    ]
    by_request = truth_table([("u1", "a", 1), ("u1", "b", 1)], request_ids=["r1", "r2"])
    m = evaluate_scores(scored_table(rows), by_request, item_info(), ks=(1,))
    # r1's positive is a (hit at 1); r2's is b (miss).
    assert m["hr@1"] == 0.5
    assert m["recall@1"] == 0.5
    assert m["positives"] == 2
    assert m["truth_coverage"] == 0.5
    # Without request_id both rows of u1 are positive in both requests; duplicates take the max.
    by_user = truth_table([("u1", "a", 1), ("u1", "b", 1), ("u1", "a", 0)])
    m = evaluate_scores(scored_table(rows), by_user, item_info(), ks=(1,))
    assert m["hr@1"] == 1.0
    assert m["recall@1"] == 0.5
    assert m["positives"] == 4
    assert m["truth_coverage"] == 1.0


def test_long_tail_mask_takes_the_top_share_with_deterministic_ties() -> None:
    popularity = [5, 1, 5, 3, 0, 2, 2, 9, 1, 1]
    tail = long_tail_mask(popularity, head_share=0.2)
    # Head = the two most popular: 9 (index 7), then the first of the tied 5s (index 0).
    assert tail.tolist() == [False, True, True, True, True, True, True, False, True, True]
    assert long_tail_mask(popularity, head_share=0.3).tolist()[2] is False
    assert long_tail_mask(popularity, head_share=0.0).all()
    assert not long_tail_mask(popularity, head_share=1.0).any()
    assert long_tail_mask([3, 2, 1, 0, 0, 0, 0], head_share=0.2).sum() == 6  # floor(1.4) = 1
    with pytest.raises(EvaluationError, match="head_share"):
        long_tail_mask(popularity, head_share=1.5)


def test_longtail_recall_counts_only_long_tail_positives() -> None:
    rows: list[Row] = [
        ("r1", "u1", "a", "exposed", 0.9),
        ("r1", "u1", "b", "exposed", 0.8),
        ("r1", "u1", "c", "retrieved", 0.7),
        ("r1", "u1", "d", "retrieved", 0.6),
        ("r2", "u2", "a", "exposed", 0.9),  # only a head positive: no long-tail recall here
    ]
    truth = [("u1", "a", 1), ("u1", "c", 1), ("u1", "d", 1), ("u2", "a", 1)]
    items = item_info("abcd", popularity=[10, 1, 1, 1])
    m = evaluate_scores(scored_table(rows), truth_table(truth), items, ks=(2, 3), head_share=0.25)
    assert m["longtail_recall@2"] == 0.0
    assert m["longtail_recall@3"] == pytest.approx(0.5)
    assert m["longtail_requests_evaluated"] == 1 and m["longtail_positives"] == 2
    assert m["recall@3"] == pytest.approx((2 / 3 + 1.0) / 2)
    # Unexposed r1 is c, d: both long-tail positives, both in the top 2.
    assert m["unexposed_longtail_recall@2"] == 1.0


def test_intra_list_distance_and_category_coverage_on_tiny_embeddings() -> None:
    rows: list[Row] = [
        ("r1", "u1", "a", "exposed", 0.9),
        ("r1", "u1", "b", "exposed", 0.8),
        ("r1", "u1", "c", "retrieved", 0.7),
        ("r1", "u1", "d", "retrieved", 0.6),
        ("r2", "u2", "e", "exposed", 0.5),  # a single item: no pair, no ILD
        ("r3", "u3", "a", "exposed", 0.9),
        ("r3", "u3", "c", "exposed", 0.8),
    ]
    items = item_info(
        "abcde",
        # c is a scaled copy of a: embeddings are normalized again before the cosine.
        embeddings=[[1, 0], [0, 1], [2, 0], [-1, 0], [0, 1]],
        categories=["x", "y", "x", "", "z"],
    )
    m = evaluate_scores(scored_table(rows), truth_table([("u1", "a", 1)]), items, ks=(1, 2, 3, 4))
    assert math.isnan(m["ild@1"])
    assert m["ild@2"] == pytest.approx((1.0 + 0.0) / 2)  # r1: a, b orthogonal; r3: a, c equal
    assert m["ild@3"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert m["ild@4"] == pytest.approx((7 / 6 + 0.0) / 2)  # r1 pair cosines 0, 1, -1, 0, 0, -1
    assert m["category_coverage@1"] == pytest.approx(2 / 3)  # top-1: a, e, a -> x, z of x, y, z
    assert m["category_coverage@2"] == 1.0


def brute_force(rows: list[Row], positive: set[tuple[str, str]], k: int) -> dict[str, float]:
    hr, recall, ndcg = [], [], []
    for request in sorted({r[0] for r in rows}):
        ranked = sorted((r for r in rows if r[0] == request), key=lambda r: (-r[4], r[2]))
        gains = [1.0 if (r[1], r[2]) in positive else 0.0 for r in ranked]
        n_pos = sum(gains)
        if n_pos == 0:
            continue
        hits = sum(gains[:k])
        hr.append(float(hits > 0))
        recall.append(hits / n_pos)
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))
        ndcg.append(dcg / sum(1 / math.log2(i + 2) for i in range(int(min(k, n_pos)))))
    return {
        f"hr@{k}": float(np.mean(hr)),
        f"recall@{k}": float(np.mean(recall)),
        f"ndcg@{k}": float(np.mean(ndcg)),
    }


def test_vectorized_metrics_match_a_per_request_brute_force() -> None:
    rng = np.random.default_rng(3)
    rows: list[Row] = []
    for r in range(40):
        n = int(rng.integers(1, 25))
        user = f"u{r % 7}"
        for item in rng.choice(60, n, replace=False):
            stage = ("retrieved", "preranked", "ranked", "exposed")[int(rng.integers(4))]
            rows.append((f"r{r}", user, f"i{item:02d}", stage, float(rng.integers(0, 5))))
    positive = {
        (f"u{u}", f"i{i:02d}")
        for u, i in zip(rng.integers(0, 7, 150), rng.integers(0, 60, 150), strict=True)
    }
    truth = truth_table([(u, i, 1) for u, i in sorted(positive)])
    items = ItemInfo(
        np.array([f"i{i:02d}" for i in range(60)], dtype=object),
        rng.normal(size=(60, 4)).astype(np.float32),
        np.array([""] * 60, dtype=object),
        np.zeros(60),
    )
    m = evaluate_scores(scored_table(rows), truth, items, ks=(1, 5, 10))
    for k in (1, 5, 10):
        for key, value in brute_force(rows, positive, k).items():
            assert m[key] == pytest.approx(value), key
    unexposed = [r for r in rows if r[3] != "exposed"]
    for key, value in brute_force(unexposed, positive, 5).items():
        assert m["unexposed_" + key] == pytest.approx(value), key
    labels = np.array([(r[1], r[2]) in positive for r in rows], dtype=int)
    scores = np.array([r[4] for r in rows])
    groups = np.array([r[0] for r in rows], dtype=object)
    assert m["gauc"] == pytest.approx(grouped_auc(groups, labels, scores))
    assert math.isnan(m["category_coverage@5"])  # no known category at all


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop_columns(["stage"]), "missing columns \\['stage'\\]"),
        (
            lambda t: t.set_column(4, "score", pa.array([0.1, math.nan, 0.3], pa.float64())),
            "1 NaN or null values",
        ),
        (
            lambda t: t.set_column(4, "score", pa.array([0.1, None, 0.3], pa.float64())),
            "1 NaN or null values",
        ),
        (
            lambda t: t.set_column(2, "item_id", pa.array(["a", "b", "a"])),
            "1 duplicate \\(request_id, item_id\\) rows, e.g. \\('r1', 'a'\\)",
        ),
        (
            lambda t: t.set_column(3, "stage", pa.array(["exposed", "shown", "exposed"])),
            "unknown values \\['shown'\\]",
        ),
        (lambda t: t.slice(0, 0), "no rows"),
        (
            lambda t: t.set_column(2, "item_id", pa.array(["a", "b", "zz"])),
            "1 scored items are missing from ItemInfo, e.g. \\['zz'\\]",
        ),
    ],
)
def test_scored_table_problems_raise_evaluation_error(
    change: Callable[[pa.Table], pa.Table], message: str
) -> None:
    rows: list[Row] = [
        ("r1", "u1", "a", "exposed", 0.1),
        ("r1", "u1", "b", "exposed", 0.2),
        ("r1", "u1", "c", "exposed", 0.3),
    ]
    with pytest.raises(EvaluationError, match=message):
        evaluate_scores(change(scored_table(rows)), truth_table([("u1", "a", 1)]), item_info())


def test_truth_problems_raise_evaluation_error() -> None:
    scored = scored_table([("r1", "u1", "a", "exposed", 0.1), ("r1", "u1", "b", "exposed", 0.2)])
    with pytest.raises(EvaluationError, match="no scored row matches any truth row"):
        evaluate_scores(scored, truth_table([("u9", "a", 1)]), item_info())
    with pytest.raises(EvaluationError, match="no scored row matches any truth row"):
        evaluate_scores(scored, truth_table([("u1", "a", 1)], request_ids=["r9"]), item_info())
    with pytest.raises(EvaluationError, match="outside \\{0, 1\\}"):
        evaluate_scores(scored, truth_table([("u1", "a", 2)]), item_info())
    with pytest.raises(EvaluationError, match="missing column 'label'"):
        evaluate_scores(scored, truth_table([("u1", "a", 1)]).drop_columns(["label"]), item_info())
    with pytest.raises(EvaluationError, match="'request_id' has 1 null values"):
        truth = truth_table([("u1", "a", 1), ("u1", "b", 0)], request_ids=["r1", None])  # type: ignore[list-item]
        evaluate_scores(scored, truth, item_info())
    with pytest.raises(EvaluationError, match="ks must be positive"):
        evaluate_scores(scored, truth_table([("u1", "a", 1)]), item_info(), ks=(0, 10))
    assert issubclass(EvaluationError, ValueError)


def test_item_info_checks_shapes_and_unique_ids() -> None:
    with pytest.raises(EvaluationError, match="embeddings must have shape"):
        item_info("abc", embeddings=[[1.0, 0.0]])
    with pytest.raises(EvaluationError, match="not unique"):
        item_info("aab")
    with pytest.raises(EvaluationError, match="popularity has NaN"):
        item_info("ab", popularity=[1.0, math.nan])
    info = ItemInfo(
        np.array(["a", "b"], dtype=object),
        np.eye(2, dtype=np.float32),
        np.array(["x", None], dtype=object),
        np.array([2.0, 1.0]),
    )
    assert info.categories.tolist() == ["x", ""]
    assert info.long_tail(0.5).tolist() == [False, True]
