from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from training.evaluation.bootstrap import (
    BootstrapSettings,
    RequestValues,
    paired_bootstrap,
    resample_counts,
)
from training.evaluation.metrics import auc
from training.evaluation.ranking import Evaluation, ItemInfo, evaluate_scores

N_ITEMS = 30
STAGES = ("retrieved", "preranked", "ranked", "exposed")


class Data:
    """Random requests (one user each, so truth joins by user and survives duplication)."""

    def __init__(self, n_requests: int, rows: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.request = np.repeat(np.arange(n_requests), rows)
        self.item = np.concatenate(
            [rng.choice(N_ITEMS, rows, replace=False) for _ in range(n_requests)]
        )
        self.stage = rng.choice(STAGES, len(self.request), p=[0.4, 0.3, 0.1, 0.2])
        self.label = rng.random(len(self.request)) < 0.2
        self.rng = rng
        self.items = ItemInfo(
            np.array([f"i{i:02d}" for i in range(N_ITEMS)], dtype=object),
            rng.normal(size=(N_ITEMS, 3)).astype(np.float32),
            np.array([f"c{i % 4}" if i % 7 else "" for i in range(N_ITEMS)], dtype=object),
            rng.random(N_ITEMS) * 10,
        )
        users = [f"u{r}" for r in self.request]
        self.truth = pa.table(
            {
                "user_id": pa.array(users, pa.string()),
                "item_id": pa.array([f"i{i:02d}" for i in self.item], pa.string()),
                "label": pa.array(self.label.astype(np.int8)),
            }
        )

    def scores(self, signal: float) -> np.ndarray:
        """Noise plus ``signal`` on positives (rounded, so some scores tie)."""
        noisy = self.rng.normal(size=len(self.label)) + signal * self.label
        return np.round(noisy, 1)

    def evaluate(self, score: np.ndarray, counts: np.ndarray | None = None) -> Evaluation:
        """Evaluate, with request r repeated ``counts[r]`` times (as ``r#copy``) when given."""
        rows = np.arange(len(score))
        copy = np.zeros(len(score), dtype=np.int64)
        if counts is not None:
            repeats = counts.astype(np.int64)[self.request]
            rows = np.repeat(rows, repeats)
            copy = np.concatenate([np.arange(k) for k in repeats]) if len(rows) else copy
        table = pa.table(
            {
                "request_id": [
                    f"r{self.request[i]:03d}#{c}" for i, c in zip(rows, copy, strict=True)
                ],
                "user_id": [f"u{self.request[i]}" for i in rows],
                "item_id": [f"i{self.item[i]:02d}" for i in rows],
                "stage": list(self.stage[rows]),
                "score": pa.array(score[rows], pa.float64()),
            }
        )
        return evaluate_scores(table, self.truth, self.items, ks=(3, 5))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def test_request_values_give_back_every_metric_of_the_table() -> None:
    data = Data(n_requests=25, rows=8, seed=0)
    m = data.evaluate(data.scores(1.0))
    values = m.request_values
    assert values is not None
    assert len(values.request_ids) == 25 and list(values.request_ids) == sorted(values.request_ids)
    for name in values.numerator:
        assert same(values.value(name), m[name]), name
    covered = set(values.numerator)
    assert {"auc", "gauc", "recall@3", "ndcg@5", "hr@5", "longtail_recall@5"} <= covered
    assert {"unexposed_auc", "unexposed_gauc", "unexposed_recall@5"} <= covered
    assert {"ild@5", "category_recall@5"} <= covered
    assert not covered & {"rows", "positives", "requests_evaluated", "truth_coverage"}


def test_pooled_auc_equals_the_rank_auc() -> None:
    data = Data(n_requests=20, rows=10, seed=1)
    score = data.scores(0.8)
    m = data.evaluate(score)
    assert m["auc"] == pytest.approx(auc(data.label.astype(int), score), abs=1e-12)
    unexposed = data.stage != "exposed"
    assert m["unexposed_auc"] == pytest.approx(
        auc(data.label[unexposed].astype(int), score[unexposed]), abs=1e-12
    )


def test_resampled_request_values_equal_evaluating_the_resampled_requests() -> None:
    # The bootstrap's premise: weighting each request's parts by how often a resample drew it
    # gives every per-request metric of the resampled (duplicated) requests exactly.
    data = Data(n_requests=15, rows=7, seed=2)
    score = data.scores(1.0)
    values = data.evaluate(score).request_values
    assert values is not None
    counts = next(resample_counts(15, BootstrapSettings(resamples=4, seed=5)))
    for w in counts:
        resampled = data.evaluate(score, counts=w)
        for name in values.numerator:
            if name.endswith("auc") and "gauc" not in name:
                continue  # pooled: first order only, see the next test
            den = float(w @ values.denominator[name])
            expected = float(w @ values.numerator[name]) / den if den else math.nan
            assert same(expected, resampled[name]), name


def test_pooled_auc_first_order_resampling_is_close_to_the_exact_one() -> None:
    data = Data(n_requests=300, rows=10, seed=3)
    score = data.scores(0.7)
    values = data.evaluate(score).request_values
    assert values is not None
    counts = next(resample_counts(300, BootstrapSettings(resamples=200, seed=1)))
    first_order = counts @ values.numerator["auc"] / (counts @ values.denominator["auc"])
    exact = np.array([auc(data.label, score, weights=w[data.request]) for w in counts])
    # Off by O(1/n_requests) (mean error 3% of the spread at 300 requests, 1.6% at 1,000):
    # the interval's ends move by a small share of its width.
    error = np.abs(first_order - exact)
    assert error.mean() < 0.05 * exact.std()
    width = np.percentile(exact, 97.5) - np.percentile(exact, 2.5)
    for q in (2.5, 97.5):
        assert abs(np.percentile(first_order, q) - np.percentile(exact, q)) < 0.05 * width


def test_paired_bootstrap_matches_brute_force_resampling() -> None:
    data = Data(n_requests=20, rows=8, seed=4)
    base_score, better_score = data.scores(0.3), data.scores(1.5)
    base, better = data.evaluate(base_score), data.evaluate(better_score)
    assert base.request_values is not None and better.request_values is not None
    settings = BootstrapSettings(resamples=30, confidence=0.9, seed=7)
    result = paired_bootstrap(
        {"exposed": [base.request_values], "better": [better.request_values]}, "exposed", settings
    )
    assert result.baseline == "exposed" and result.requests == 20
    counts = np.concatenate(list(resample_counts(20, settings)))
    diffs: dict[str, list[float]] = {}
    for w in counts:
        a, b = data.evaluate(base_score, w), data.evaluate(better_score, w)
        for name in ("gauc", "recall@3", "ndcg@5", "unexposed_hr@5", "ild@3", "category_recall@5"):
            diffs.setdefault(name, []).append(b[name] - a[name])
    for name, values in diffs.items():
        interval = result.intervals["better"][name]
        assert interval.difference == pytest.approx(better[name] - base[name], abs=1e-12)
        low, high = np.nanquantile(values, [0.05, 0.95])
        assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-12), name
    assert result.intervals["better"]["recall@5"].low > 0  # clearly better on these requests
    assert "exposed" not in result.intervals
    assert result.estimates["exposed"]["auc"] == pytest.approx(base["auc"])


def test_identical_methods_get_a_zero_interval_and_seeds_are_averaged() -> None:
    data = Data(n_requests=30, rows=6, seed=5)
    one, two = data.scores(1.0), data.scores(1.0)
    base = data.evaluate(one).request_values
    seeds = [data.evaluate(one).request_values, data.evaluate(two).request_values]
    assert base is not None and seeds[0] is not None and seeds[1] is not None
    result = paired_bootstrap(
        {"same": [base], "exposed": [base], "two seeds": [seeds[0], seeds[1]]},
        "exposed",
        BootstrapSettings(resamples=50),
    )
    for interval in result.intervals["same"].values():
        if not math.isnan(interval.difference):
            assert (interval.difference, interval.low, interval.high) == (0.0, 0.0, 0.0)
    mean_ndcg = (seeds[0].value("ndcg@5") + seeds[1].value("ndcg@5")) / 2
    assert result.estimates["two seeds"]["ndcg@5"] == pytest.approx(mean_ndcg)
    # The same seed, the same intervals.
    again = paired_bootstrap(
        {"exposed": [base], "two seeds": [seeds[0], seeds[1]]},
        "exposed",
        BootstrapSettings(resamples=50),
    )
    assert again.intervals["two seeds"] == result.intervals["two seeds"]


def test_bad_inputs_raise() -> None:
    values = RequestValues(
        np.array(["r1", "r2"], dtype=object), {"x": np.ones(2)}, {"x": np.ones(2)}
    )
    other = RequestValues(
        np.array(["r1", "r3"], dtype=object), {"x": np.ones(2)}, {"x": np.ones(2)}
    )
    with pytest.raises(ValueError, match="not among the methods"):
        paired_bootstrap({"a": [values]}, "b")
    with pytest.raises(ValueError, match="other requests"):
        paired_bootstrap({"a": [values], "b": [other]}, "a")
    with pytest.raises(ValueError, match="resamples"):
        BootstrapSettings(resamples=1)
    with pytest.raises(ValueError, match="confidence"):
        BootstrapSettings(confidence=1.0)
    with pytest.raises(ValueError, match="seed must be non-negative"):
        BootstrapSettings(seed=-1)  # numpy would refuse it only when drawing, after training
    with pytest.raises(ValueError, match="shape"):
        RequestValues(np.array(["r1"], dtype=object), {"x": np.ones(2)}, {"x": np.ones(2)})


def test_metrics_taken_from_another_evaluation_bring_their_parts() -> None:
    # A cascade's pooled AUCs come from its served probabilities: with the values alone, their
    # parts would still describe the cascade's order and the report would show no interval.
    data = Data(n_requests=20, rows=8, seed=6)
    ranked, served = data.evaluate(data.scores(1.0)), data.evaluate(data.scores(0.5))
    before = dict(ranked)
    merged = ranked.with_metrics_from(served, ["auc", "unexposed_auc"])
    values = merged.request_values
    assert values is not None
    for name in ("auc", "unexposed_auc"):
        assert merged[name] == served[name] != ranked[name]
        assert same(values.value(name), served[name]), name
    for name in ("gauc", "ndcg@5", "recall@3"):
        assert merged[name] == ranked[name] and same(values.value(name), ranked[name]), name
    assert dict(ranked) == before  # the original is left as it was
    assert ranked.request_values is not None
    assert same(ranked.request_values.value("auc"), ranked["auc"])

    # Parts the other evaluation lacks are dropped, not kept for a value they do not describe.
    bare = ranked.with_metrics_from(Evaluation(dict(served)), ["auc"])
    assert bare["auc"] == served["auc"] and bare.request_values is not None
    assert "auc" not in bare.request_values.numerator
    assert "gauc" in bare.request_values.numerator
    assert Evaluation(dict(ranked)).with_metrics_from(served, ["auc"]).request_values is None

    with pytest.raises(ValueError, match="not in the other evaluation"):
        ranked.with_metrics_from(served, ["nope"])
    other = Data(n_requests=21, rows=8, seed=6)
    with pytest.raises(ValueError, match="different requests"):
        ranked.with_metrics_from(other.evaluate(other.scores(1.0)), ["auc"])
