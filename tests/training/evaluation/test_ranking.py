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
    without_global_negatives,
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


def test_intra_list_distance_and_category_recall_on_tiny_embeddings() -> None:
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
    # u1's positives: a (x), b (y), d (unknown); u3's: c (x); u2 has none.
    truth = truth_table([("u1", "a", 1), ("u1", "b", 1), ("u1", "d", 1), ("u3", "c", 1)])
    m = evaluate_scores(scored_table(rows), truth, items, ks=(1, 2, 3, 4))
    assert math.isnan(m["ild@1"])
    assert m["ild@2"] == pytest.approx((1.0 + 0.0) / 2)  # r1: a, b orthogonal; r3: a, c equal
    assert m["ild@3"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert m["ild@4"] == pytest.approx((7 / 6 + 0.0) / 2)  # r1 pair cosines 0, 1, -1, 0, 0, -1
    # r1 wants {x, y}: top-1 (a) shows x; r3 wants {x}: top-1 (a) shows x.
    assert m["category_recall@1"] == pytest.approx((1 / 2 + 1.0) / 2)
    assert m["category_recall@2"] == 1.0
    assert m["category_requests_evaluated"] == 2  # r2 has no positive
    assert "category_coverage@1" not in m


def test_category_recall_tells_scorers_apart_where_pooled_coverage_could_not() -> None:
    # The removed category_coverage@K pooled every request's top K: with more lists than
    # categories it reached 1.0 for any scorer. Here both scorers' top-2 lists together show
    # every category, yet only one reaches each user's own interests.
    cats = {"a": "x", "b": "y", "c": "x", "d": "y"}
    truth = truth_table([("u1", "a", 1), ("u1", "b", 1), ("u2", "c", 1), ("u2", "d", 1)])
    items = item_info("abcd", categories=list(cats.values()))

    def rows(order: dict[str, list[str]]) -> list[Row]:
        out: list[Row] = []
        for request, user in (("r1", "u1"), ("r2", "u2")):
            for rank, item in enumerate(order[request]):
                out.append((request, user, item, "retrieved", 1.0 - rank / 10))
        return out

    # Each request has the other's positives as candidates too (same categories).
    focused = rows({"r1": ["a", "c", "b", "d"], "r2": ["d", "b", "c", "a"]})
    diverse = rows({"r1": ["a", "b", "c", "d"], "r2": ["c", "d", "a", "b"]})
    m_focused = evaluate_scores(scored_table(focused), truth, items, ks=(2,))
    m_diverse = evaluate_scores(scored_table(diverse), truth, items, ks=(2,))
    assert m_focused["category_recall@2"] == pytest.approx(0.5)
    assert m_diverse["category_recall@2"] == 1.0


def test_without_global_negatives_keeps_the_recalled_candidates() -> None:
    requests = pa.table(
        {
            "request_id": ["r1", "r1", "r1", "r2", "r2"],
            "user_id": ["u1", "u1", "u1", "u2", "u2"],
            "item_id": ["a", "b", "e", "a", "d"],
            "stage": ["exposed", "retrieved", "retrieved", "exposed", "retrieved"],
            "group": [
                "exposed_positive",
                "prerank_negative",
                "global_negative",
                "exposed_negative",
                "global_negative",
            ],
        }
    )
    kept, dropped = without_global_negatives(requests)
    assert dropped == 2
    assert kept.column("item_id").to_pylist() == ["a", "b", "a"]
    assert without_global_negatives(kept) == (kept, 0)
    no_group = requests.drop_columns(["group"])
    assert without_global_negatives(no_group) == (no_group, 0)

    # Easy random negatives scored low lift the pooled AUC and the unexposed metrics: the
    # recalled candidates alone are what the pre-ranker faces at serving.
    truth = truth_table([("u1", "b", 1), ("u2", "a", 1)])
    score = {"a": 0.6, "b": 0.5, "e": 0.0, "d": 0.1}

    def scored(table: pa.Table) -> pa.Table:
        items = table.column("item_id").to_pylist()
        return table.select(["request_id", "user_id", "item_id", "stage"]).append_column(
            "score", pa.array([score[i] for i in items], pa.float64())
        )

    with_global = evaluate_scores(scored(requests), truth, item_info(), ks=(1,))
    recalled = evaluate_scores(scored(kept), truth, item_info(), ks=(1,))
    assert with_global["rows"] == 5 and recalled["rows"] == 3
    # Positives b (r1, 0.5) and a (r2, 0.6) against r1's a (0.6): a loss and a tie, 0.5 of 2
    # pairs; the random negatives e (0.0) and d (0.1) add 4 won pairs: 4.5 of 6.
    assert with_global["auc"] == pytest.approx(4.5 / 6)
    assert recalled["auc"] == pytest.approx(0.5 / 2)
    assert with_global["unexposed_rows"] == 3 and recalled["unexposed_rows"] == 1
    assert with_global["truth_coverage"] == pytest.approx(2 / 5)
    assert recalled["truth_coverage"] == pytest.approx(2 / 3)


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
    assert math.isnan(m["category_recall@5"])  # no known category at all
    assert m["category_requests_evaluated"] == 0


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
