"""The statistics job: a click counts on the day it became known (``label_timestamp``)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.factories import T0, make_items, make_requests
from training.data.contract import conform
from training.features.stats import compute_feature_tables


def _row(
    request: str, item: str, day: float, stage: str, label: int | None, known: float | None
) -> dict[str, object]:
    group = {1: "exposed_positive", 0: "exposed_negative"}.get(label or 0, "prerank_negative")
    if stage != "exposed":
        group = "prerank_negative"
    return {
        "request_id": request,
        "user_id": "u",
        "item_id": item,
        "event_timestamp": T0 + timedelta(days=day),
        "stage": stage,
        "prerank_position": 1,
        "rank_position": 1 if stage == "exposed" else None,
        "label": label,
        "group": group,
        "label_timestamp": None if known is None else T0 + timedelta(days=known),
    }


def _snapshots(table: pa.Table, key: str) -> dict[int, dict[str, object]]:
    """Snapshot rows of one entity, by day index of their timestamp."""
    df = table.to_pandas()
    df = df[df[key] == ("a" if key == "item_id" else "u")]
    days = (df["event_timestamp"] - pd.Timestamp(T0)).dt.days
    return {int(d): r for d, (_, r) in zip(days, df.iterrows(), strict=True)}


def test_a_late_click_counts_on_the_day_it_became_known() -> None:
    rows = [
        _row("r1", "a", 0.5, "exposed", 1, 3.25),  # shown on day 0, clicked on day 3
        _row("r1", "b", 0.5, "retrieved", None, None),
        _row("r2", "a", 5.5, "exposed", 0, None),
    ]
    requests = conform(pa.Table.from_pylist(rows), "requests")
    tables = compute_feature_tables(make_items(1), requests)
    item = _snapshots(tables.item_popularity, "item_id")
    user = _snapshots(tables.user_activity, "user_id")
    # Snapshot of day D (stamped D + 1): the impression on day 0, the click only from day 3 on.
    assert tables.info["clicks_known_on_a_later_day"] == 1
    assert sorted(item) == [1, 4, 6]
    assert (item[1]["impressions"], item[1]["clicks"], item[1]["candidate_count"]) == (1, 0, 1)
    assert (item[4]["impressions"], item[4]["clicks"], item[4]["candidate_count"]) == (1, 1, 1)
    assert (item[6]["impressions"], item[6]["clicks"], item[6]["candidate_count"]) == (2, 1, 2)
    assert sorted(user) == [1, 4, 6]
    assert (user[1]["requests"], user[1]["clicks"], user[1]["active_days"]) == (1, 0, 1)
    assert (user[4]["requests"], user[4]["clicks"], user[4]["active_days"]) == (1, 1, 2)
    assert user[1]["clicked_popularity_mean"] == 0.0
    # The clicked item's popularity as known at its impression: no snapshot before day 0.
    assert user[4]["clicked_popularity_mean"] == 0.0
    assert user[6]["clicked_popularity_mean"] == 0.0

    # Without the column, the same click counts on its request's day (the old behaviour).
    tables = compute_feature_tables(make_items(1), requests.drop_columns(["label_timestamp"]))
    item = _snapshots(tables.item_popularity, "item_id")
    assert tables.info["clicks_known_on_a_later_day"] == 0
    assert sorted(item) == [1, 6]
    assert item[1]["clicks"] == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_counts_match_a_recount_by_the_day_each_event_was_known(seed: int) -> None:
    requests = make_requests(n_requests=120, n_users=6, n_items=15, seed=seed)
    rng = np.random.default_rng(seed)
    clicked = requests.column("label").to_numpy(zero_copy_only=False) == 1
    delay = pd.to_timedelta(rng.integers(0, 6 * 24 * 60, requests.num_rows), unit="min")
    ts = requests.column("event_timestamp").to_pandas()
    known = pd.Series(ts + delay).where(clicked)
    requests = requests.append_column(
        "label_timestamp", pa.array(known, pa.timestamp("us", tz="UTC"))
    )
    # Some retrieved-only rows become global random negatives (never in the funnel).
    group = requests.column("group").to_numpy(zero_copy_only=False).copy()
    stage = requests.column("stage").to_numpy(zero_copy_only=False)
    drawn = (stage == "retrieved") & (rng.random(requests.num_rows) < 0.5)
    group[drawn] = "global_negative"
    requests = requests.set_column(
        requests.schema.get_field_index("group"), "group", pa.array(group, pa.string())
    )
    # As the contract has it: a global negative has no funnel position.
    index = requests.schema.get_field_index("prerank_position")
    positions = pc.if_else(pa.array(drawn), None, requests.column(index))
    requests = requests.set_column(index, requests.schema.field(index), positions)
    requests = conform(requests, "requests")
    tables = compute_feature_tables(make_items(15), requests)
    log = requests.to_pandas()
    log["day"] = log["event_timestamp"].dt.floor("D")
    log["click_day"] = log["label_timestamp"].dt.floor("D")
    late = int((log["click_day"] > log["day"]).sum())
    assert late > 10  # many clicks known only days later
    assert tables.info["clicks_known_on_a_later_day"] == late
    assert (log["group"] == "global_negative").sum() > 0
    for snap in tables.item_popularity.to_pandas().itertuples():
        rows = log[log["item_id"] == snap.item_id]
        funnel = rows[rows["group"] != "global_negative"]
        assert snap.candidate_count == (funnel["day"] < snap.event_timestamp).sum()
        assert (
            snap.impressions
            == ((rows["day"] < snap.event_timestamp) & (rows["stage"] == "exposed")).sum()
        )
        assert snap.clicks == (rows["click_day"] < snap.event_timestamp).sum()
    for snap in tables.user_activity.to_pandas().itertuples():
        rows = log[log["user_id"] == snap.user_id]
        seen = rows[rows["day"] < snap.event_timestamp]
        assert snap.requests == seen["request_id"].nunique()
        assert snap.clicks == (rows["click_day"] < snap.event_timestamp).sum()
        days = set(seen["day"]) | set(
            rows.loc[rows["click_day"] < snap.event_timestamp, "click_day"]
        )
        assert snap.active_days == len(days)


def test_a_history_from_request_clicks_gains_a_click_when_it_became_known() -> None:
    """Without an interactions table, user_history comes from the log's clicks: a click shown on
    day 0 and known on day 3 is in the history from day 3's snapshot on, not day 0's."""
    rows = [
        _row("r1", "a", 0.5, "exposed", 1, 3.25),
        _row("r2", "b", 1.5, "exposed", 1, None),  # no label_timestamp: known at the request
    ]
    requests = conform(pa.Table.from_pylist(rows), "requests")
    history = compute_feature_tables(make_items(2), requests).user_history.to_pandas()
    days = ((history["event_timestamp"] - pd.Timestamp(T0)).dt.days).tolist()
    items = [list(v) for v in history["recent_item_ids"]]
    assert list(zip(days, items, strict=True)) == [(2, ["b"]), (4, ["b", "a"])]
