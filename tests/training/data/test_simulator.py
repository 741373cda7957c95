"""Tests of the funnel simulator on a small, seeded interaction log built here."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from pydantic import ValidationError

from training.data.contract import TIMESTAMP, conform
from training.data.simulator import (
    FunnelResult,
    RetrievalMix,
    SimulatorConfig,
    simulate_funnel,
)
from training.io import read_manifest, read_table

N_USERS = 60
N_ITEMS = 300
WARMUP = 5  # interactions per user in the warm-up period: exactly min_history
DAY_US = 86_400 * 1_000_000
T0_US = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000

SMALL = {
    "retrieval_size": 60,
    "prerank_size": 30,
    "rank_size": 15,
    "exposed_size": 5,
    "progress": False,
}


def make_items(n_items: int, extra: tuple[str, ...] = ()) -> pa.Table:
    ids = [f"i{i}" for i in range(n_items)] + list(extra)
    return pa.table(
        {
            "item_id": ids,
            "text": [f"item {i}" for i in ids],
            "event_timestamp": pa.array(np.full(len(ids), T0_US), pa.int64()).cast(TIMESTAMP),
        }
    )


def make_log(seed: int = 0, hit: str | None = None) -> pd.DataFrame:
    """Users with Zipf-like item choices: WARMUP interactions on day 0, the rest on days 2-100.

    With ``hit="late"`` every user engages with item ``late`` after every other interaction; with
    ``hit="early"`` half the users engage with it during the warm-up (so it is popular early).
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8
    weights /= weights.sum()
    rows: list[tuple[str, str, int]] = []
    for u in range(N_USERS):
        n = int(rng.integers(15, 30))
        chosen = rng.choice(N_ITEMS, n, replace=False, p=weights)
        warm = np.sort(rng.integers(0, DAY_US, WARMUP))
        later = np.sort(rng.integers(2 * DAY_US, 100 * DAY_US, n - WARMUP))
        later[1::7] = later[0::7][: len(later[1::7])]  # some equal timestamps (ties)
        times = np.r_[warm, np.sort(later)]
        rows += [(f"u{u}", f"i{i}", T0_US + int(t)) for i, t in zip(chosen, times, strict=True)]
        if hit == "late":
            rows.append((f"u{u}", "late", T0_US + 101 * DAY_US + u))
        elif hit == "early" and u % 2 == 0:
            rows.append((f"u{u}", "late", T0_US + DAY_US + u))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])


def to_table(log: pd.DataFrame) -> pa.Table:
    return pa.table(
        {
            "user_id": log["user_id"].tolist(),
            "item_id": log["item_id"].tolist(),
            "event_timestamp": pa.array(log["ts"].to_numpy(), pa.int64()).cast(TIMESTAMP),
        }
    )


def run(log: pd.DataFrame, extra_items: tuple[str, ...] = (), **cfg: object) -> FunnelResult:
    config = SimulatorConfig.model_validate({**SMALL, **cfg})
    return simulate_funnel(make_items(N_ITEMS, extra_items), to_table(log), config)


@pytest.fixture(scope="module")
def log() -> pd.DataFrame:
    return make_log()


@pytest.fixture(scope="module")
def result(log: pd.DataFrame) -> FunnelResult:
    return run(log)


@pytest.fixture(scope="module")
def req(result: FunnelResult) -> pd.DataFrame:
    return result.requests.to_pandas()


def us(column: pd.Series) -> np.ndarray:
    """Microseconds since the epoch of a UTC timestamp column."""
    delta = column - pd.Timestamp(0, tz="UTC")
    return (delta // pd.Timedelta(microseconds=1)).to_numpy(dtype=np.int64)


def test_tables_conform_to_contract(result: FunnelResult) -> None:
    conform(result.requests, "requests")
    conform(result.truth, "truth")
    assert "request_id" in result.truth.column_names
    assert result.stats["requests"] > 100


def test_deterministic_by_seed(log: pd.DataFrame, result: FunnelResult) -> None:
    again = run(log)
    assert again.requests.equals(result.requests)
    assert again.truth.equals(result.truth)
    other = run(log, seed=1)
    assert not other.requests.equals(result.requests)


def test_exact_funnel_sizes_per_request(req: pd.DataFrame) -> None:
    funnel = req[req["group"] != "global_negative"]
    per = funnel.groupby("request_id")
    assert (per.size() == 60).all()
    assert (per["rank_position"].count() == 30).all()
    assert (per["stage"].apply(lambda s: s.isin(["ranked", "exposed"]).sum()) == 15).all()
    assert (per["stage"].apply(lambda s: (s == "exposed").sum()) == 5).all()


def test_positions_are_permutations(req: pd.DataFrame) -> None:
    funnel = req[req["group"] != "global_negative"]
    for _, rows in funnel.groupby("request_id"):
        assert sorted(rows["prerank_position"].astype(int)) == list(range(1, 61))
        ranked = rows.dropna(subset=["rank_position"])
        assert sorted(ranked["rank_position"].astype(int)) == list(range(1, 31))
        # Only the pre-rank's top 30 reach the ranker; the exposed are the ranker's top 5.
        assert set(ranked["prerank_position"].astype(int)) == set(range(1, 31))
        exposed = rows[rows["stage"] == "exposed"]
        assert set(exposed["rank_position"].astype(int)) == set(range(1, 6))


def test_group_stage_label_consistency(req: pd.DataFrame) -> None:
    expected = {
        "global_negative": {"retrieved"},
        "prerank_negative": {"retrieved"},
        "rank_negative": {"preranked", "ranked"},
        "exposed_negative": {"exposed"},
        "exposed_positive": {"exposed"},
    }
    for group, stages in expected.items():
        assert set(req.loc[req["group"] == group, "stage"]) <= stages, group
    assert req.loc[req["stage"] != "exposed", "label"].isna().all()
    assert (req.loc[req["group"] == "exposed_positive", "label"] == 1).all()
    assert (req.loc[req["group"] == "exposed_negative", "label"] == 0).all()
    assert (req.loc[req["stage"] == "preranked", "rank_position"] > 15).all()
    glob = req[req["group"] == "global_negative"]
    assert glob["prerank_position"].isna().all() and glob["rank_position"].isna().all()


def history_of(log: pd.DataFrame, req: pd.DataFrame) -> dict[str, set[str]]:
    heads = req.drop_duplicates("request_id")
    by_user = {u: g for u, g in log.groupby("user_id")}
    out = {}
    for rid, user, ts in zip(
        heads["request_id"], heads["user_id"], us(heads["event_timestamp"]), strict=True
    ):
        events = by_user[user]
        out[rid] = set(events.loc[events["ts"] < ts, "item_id"])
    return out


def test_requests_have_history_and_time_points(log: pd.DataFrame, req: pd.DataFrame) -> None:
    history = history_of(log, req)
    assert all(len(h) >= 5 for h in history.values())
    heads = req.drop_duplicates("request_id")
    assert heads.groupby("user_id").size().max() <= 4
    # Every request time is one of the user's interaction times.
    pairs = set(zip(log["user_id"], log["ts"], strict=True))
    times = us(heads["event_timestamp"])
    assert all((u, t) in pairs for u, t in zip(heads["user_id"], times, strict=True))


def test_candidates_exclude_history_and_global_negatives(
    log: pd.DataFrame, req: pd.DataFrame
) -> None:
    history = history_of(log, req)
    for rid, rows in req.groupby("request_id"):
        glob = rows[rows["group"] == "global_negative"]
        funnel = rows[rows["group"] != "global_negative"]
        n_pos = int((rows["group"] == "exposed_positive").sum())
        assert len(glob) == 2 * n_pos
        assert not set(funnel["item_id"]) & history[str(rid)]
        assert not set(glob["item_id"]) & history[str(rid)]
        assert not set(glob["item_id"]) & set(funnel["item_id"])
    assert (req["group"] == "global_negative").sum() > 0


def test_history_kept_when_not_excluded(log: pd.DataFrame) -> None:
    req = run(log, exclude_history=False).requests.to_pandas()
    history = history_of(log, req)
    funnel = req[req["group"] != "global_negative"]
    overlap = sum(
        len(set(g["item_id"]) & history[str(rid)]) for rid, g in funnel.groupby("request_id")
    )
    assert overlap > 0  # popular items the user already had now come back


def test_truth_covers_rows_and_matches_clicks(
    log: pd.DataFrame, result: FunnelResult, req: pd.DataFrame
) -> None:
    truth = result.truth.to_pandas()
    assert len(truth) == len(req)
    assert not truth.duplicated(["request_id", "item_id"]).any()
    merged = req.merge(truth, on=["request_id", "item_id"], suffixes=("", "_truth"))
    assert len(merged) == len(req)
    assert (merged["user_id"] == merged["user_id_truth"]).all()
    exposed = merged[merged["stage"] == "exposed"]
    assert (exposed["label"] == exposed["label_truth"]).all()
    # Truth = among the user's first 20 interactions at or after the request time.
    by_user = {str(u): g.sort_values("ts", kind="stable") for u, g in log.groupby("user_id")}
    for (rid, user), rows in merged.groupby(["request_id", "user_id"]):
        ts = us(rows["event_timestamp"])[0]
        events = by_user[str(user)]
        future = set(events.loc[events["ts"] >= ts, "item_id"].head(20))
        assert (rows["label_truth"] == rows["item_id"].isin(future).astype(int)).all(), rid
    assert merged["label_truth"].sum() > merged["label"].fillna(0).sum()  # unexposed positives


def test_label_timestamp_is_the_clicks_own_time(log: pd.DataFrame, req: pd.DataFrame) -> None:
    """A click becomes known at the item's first engagement in the future window, not before."""
    assert req["label_timestamp"].notna().sum() == (req["label"] == 1).sum()
    clicks = req[req["label"] == 1]
    assert (clicks["label_timestamp"] >= clicks["event_timestamp"]).all()
    by_user = {str(u): g.sort_values("ts", kind="stable") for u, g in log.groupby("user_id")}
    for row in clicks.itertuples():
        events = by_user[str(row.user_id)]
        future = events[events["ts"] >= us(pd.Series([row.event_timestamp]))[0]].head(20)
        first = future.loc[future["item_id"] == row.item_id, "ts"].min()
        assert us(pd.Series([row.label_timestamp]))[0] == first, row.request_id
    # In this log engagements are days apart: most clicks are known only on a later day.
    later_day = clicks["label_timestamp"].dt.floor("D") > clicks["event_timestamp"].dt.floor("D")
    assert later_day.mean() > 0.5


def test_popularity_is_leak_free() -> None:
    # The item "late" becomes everyone's engagement only after every request bucket's data:
    # popularity-only retrieval must never surface it. Early, the same item is retrieved.
    popular_only = {"retrieval_mix": RetrievalMix(popular=1.0, cooccurrence=0.0, random=0.0)}
    late = run(make_log(hit="late"), ("late",), **popular_only)
    assert late.stats["requests_per_bucket"][0] == 0  # no cold-start request retrieves randomly
    late_req = late.requests.to_pandas()
    funnel = late_req[late_req["group"] != "global_negative"]
    assert not (funnel["item_id"] == "late").any()
    # With whole-log popularity "late" (60 engagements, the most of any item) would top every
    # request's retrieval; the last bucket holds requests that would see it if it leaked.
    assert late.stats["requests_per_bucket"][-1] > 0

    early = run(make_log(hit="early"), ("late",), **popular_only).requests.to_pandas()
    heads = early.drop_duplicates("request_id")
    without = heads[heads["user_id"].map(lambda u: int(u[1:]) % 2 == 1)]  # not in history
    got = set(early.loc[early["item_id"] == "late", "request_id"])
    assert set(without["request_id"]) <= got


def test_stats(result: FunnelResult, req: pd.DataFrame) -> None:
    stats = result.stats
    assert stats["requests"] == req["request_id"].nunique()
    assert stats["rows"] == len(req)
    assert sum(stats["rows_per_group"].values()) == len(req)
    exposed = req[req["stage"] == "exposed"]
    assert stats["ctr_exposed"] == pytest.approx(exposed["label"].mean())
    recall = stats["recall"]
    assert 1 >= recall["retrieved"] >= recall["preranked"] >= recall["ranked"]
    assert recall["ranked"] >= recall["exposed"] > 0
    bias = stats["exposure_bias"]
    assert bias["mean_log_popularity_exposed"] > bias["mean_log_popularity_retrieved"]
    assert 0 < bias["unexposed_positive_share"] < 1
    assert stats["interactions_dropped_not_in_catalog"] == 0


def test_unknown_items_dropped_and_counted(log: pd.DataFrame) -> None:
    extra = pd.DataFrame(
        {"user_id": ["u0", "u1"], "item_id": ["ghost", "ghost"], "ts": [T0_US] * 2}
    )
    result = run(pd.concat([log, extra], ignore_index=True))
    assert result.stats["interactions_dropped_not_in_catalog"] == 2
    assert result.stats["interactions_used"] == len(log)
    assert "ghost" not in set(result.requests.column("item_id").to_pylist())


def test_retrieval_clamped_to_catalog() -> None:
    log = make_log()
    small = log[log["item_id"].isin([f"i{i}" for i in range(70)])]
    config = SimulatorConfig.model_validate({**SMALL, "min_history": 3})
    result = simulate_funnel(make_items(70), to_table(small), config)
    req = result.requests.to_pandas()
    conform(result.requests, "requests")
    assert result.stats["requests_retrieval_clamped"] > 0
    sizes = req[req["group"] != "global_negative"].groupby("request_id").size()
    assert sizes.max() <= 60 and sizes.min() < 60


def test_write_round_trip(result: FunnelResult, tmp_path: Path) -> None:
    cfg = SimulatorConfig.model_validate(SMALL)
    paths = result.write(tmp_path / "run", cfg.model_dump(), inputs={"dataset": "test"})
    assert read_table(paths["requests"], "requests").equals(result.requests)
    assert read_table(paths["truth"], "truth").equals(result.truth)
    manifest = read_manifest(tmp_path / "run")
    assert manifest["config"]["retrieval_size"] == 60
    assert manifest["metrics"]["requests"] == result.stats["requests"]


@pytest.mark.parametrize(
    "bad",
    [
        {"rank_size": 300},
        {"retrieval_mix": {"popular": 0.5, "cooccurrence": 0.5, "random": 0.5}},
        {"prerank_noise": -1.0},
        {"cooc_window": 1},
        {"unknown": 1},
    ],
)
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SimulatorConfig.model_validate(bad)


def test_items_are_never_retrieved_before_they_exist(log: pd.DataFrame) -> None:
    """An item enters the catalog at its event_timestamp (MovieLens: its first rating). The
    simulator once retrieved and exposed items before it, whose features a point-in-time join
    cannot find (8% of MovieLens' rows)."""
    items = make_items(N_ITEMS)
    release = np.full(N_ITEMS, T0_US, dtype=np.int64)
    release[::3] = T0_US + 50 * DAY_US  # a third of the catalog appears on day 50
    items = items.set_column(2, "event_timestamp", pa.array(release, pa.int64()).cast(TIMESTAMP))
    config = SimulatorConfig.model_validate(SMALL)
    result = simulate_funnel(items, to_table(log), config)
    req = result.requests.to_pandas()
    released_at = dict(zip(items.column("item_id").to_pylist(), release, strict=True))
    item_us = req["item_id"].map(released_at).to_numpy(dtype=np.int64)
    assert (item_us <= us(req["event_timestamp"])).all()
    late = req[item_us > T0_US]
    assert len(late) and (us(late["event_timestamp"]) >= T0_US + 50 * DAY_US).all()
    assert set(late["group"]) >= {"prerank_negative", "global_negative"}
    assert result.stats["unreleased_items_excluded"] > 0
    assert run(log).stats["unreleased_items_excluded"] == 0
