"""The training-set builder: rows in == rows out, defaults + indicators, no leakage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.factories import T0, make_items, make_requests, write_empty_anchors
from training.features.stats import StatsConfig, compute_feature_tables
from training.features.store import StoreSettings, apply_definitions, open_store
from training.features.training_set import RowsLostError, build_training_set
from training.io import read_manifest


@pytest.fixture
def built(tmp_path: Path):  # type: ignore[no-untyped-def]
    items = make_items(40)
    requests = make_requests(n_requests=150, n_users=12, n_items=40, seed=5)
    compute_feature_tables(items, requests).write(tmp_path, StatsConfig())
    write_empty_anchors(tmp_path)
    store = open_store(tmp_path, StoreSettings(project="ts"))
    apply_definitions(store)
    return store, items, requests


def test_rows_out_equal_rows_in_and_order_kept(built) -> None:  # type: ignore[no-untyped-def]
    store, _, requests = built
    ts = build_training_set(store, requests)
    assert ts.table.num_rows == requests.num_rows
    for col in requests.column_names:
        assert ts.table.column(col).equals(requests.column(col)), col
    # No nulls anywhere in features: defaults were filled.
    for col in ts.feature_columns + ts.missing_indicators:
        assert ts.table.column(col).null_count == 0, col


def test_features_count_only_events_from_earlier_days(built) -> None:  # type: ignore[no-untyped-def]
    """Recompute every joined statistic from the raw log: only strictly earlier days count."""
    store, _, requests = built
    out = build_training_set(store, requests).table.to_pandas()
    log = requests.to_pandas()
    log["day"] = log["event_timestamp"].dt.floor("D")
    out["day"] = out["event_timestamp"].dt.floor("D")
    for _, row in out.sample(200, random_state=0).iterrows():
        before = log[log["event_timestamp"] < row["day"]]
        item_rows = before[before["item_id"] == row["item_id"]]
        user_rows = before[before["user_id"] == row["user_id"]]
        assert row["item_popularity__candidate_count"] == len(item_rows)
        assert row["item_popularity__impressions"] == (item_rows["stage"] == "exposed").sum()
        assert row["item_popularity__missing"] == int(len(item_rows) == 0)
        assert row["user_activity__clicks"] == (user_rows["label"] == 1).sum()
        assert row["user_activity__requests"] == user_rows["request_id"].nunique()
        assert row["user_activity__missing"] == int(len(user_rows) == 0)
        clicks = user_rows[user_rows["label"] == 1].sort_values("event_timestamp", kind="stable")
        assert list(row["user_history__recent_item_ids"]) == list(clicks["item_id"][-20:])
        assert len(row["user_interest_anchors__anchor_item_ids"]) == 0


def test_missing_rows_get_declared_defaults(built) -> None:  # type: ignore[no-untyped-def]
    store, _, requests = built
    # A request before any activity and for unknown ids: every view but content is missing.
    extra = requests.slice(0, 1).to_pandas()
    extra["request_id"] = "early"
    extra["user_id"] = "never-seen"
    extra["item_id"] = "not-in-catalog"
    extra["event_timestamp"] = pd.Timestamp(T0)
    table = pa.concat_tables(
        [requests, pa.Table.from_pandas(extra, schema=requests.schema, preserve_index=False)]
    )
    out = build_training_set(store, table).table.to_pandas().iloc[-1]
    assert out["user_activity__missing"] == 1
    assert out["item_popularity__missing"] == 1
    assert out["item_content__missing"] == 1
    assert out["user_activity__clicks"] == 0
    assert out["item_popularity__ctr_smoothed"] == 0.0
    assert out["item_content__category"] == ""


def test_written_with_manifest(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, _, requests = built
    ts = build_training_set(store, requests)
    path = ts.write(tmp_path)
    assert pq.read_table(path).num_rows == requests.num_rows
    manifest = read_manifest(path.parent)
    assert manifest["metrics"]["rows"] == requests.num_rows
    assert set(manifest["metrics"]["coverage"]) == {
        "user_activity",
        "user_history",
        "user_interest_anchors",
        "item_content",
        "item_popularity",
    }
    assert manifest["metrics"]["coverage"]["user_interest_anchors"] == 0.0


def test_lost_rows_are_detected(built, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    store, _, requests = built
    real = store.get_historical_features

    class Dropping:
        def __init__(self, job) -> None:  # type: ignore[no-untyped-def]
            self.job = job

        def to_arrow(self) -> pa.Table:
            return self.job.to_arrow().slice(1)

    monkeypatch.setattr(store, "get_historical_features", lambda **kw: Dropping(real(**kw)))
    with pytest.raises(RowsLostError, match="rows"):
        build_training_set(store, requests)


def test_stats_are_float32_and_int64(built) -> None:  # type: ignore[no-untyped-def]
    _, items, requests = built
    tables = compute_feature_tables(items, requests)
    schema = tables.item_popularity.schema
    assert schema.field("impressions").type == pa.int64()
    assert schema.field("ctr_smoothed").type == pa.float32()
    assert schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    ctr = tables.user_activity.column("ctr_smoothed").to_numpy()
    assert np.all((ctr > 0) & (ctr < 1))


def test_each_service_writes_its_own_set(tmp_path: Path) -> None:
    """Joining the labels' service once overwrote the pre-ranker's training set."""
    import pyarrow as pa

    from training.features.training_set import TrainingSet

    table = pa.table({"request_id": ["r1"], "item_id": ["i1"]})
    default = TrainingSet(table, [], [], "preranker").write(tmp_path)
    labels = TrainingSet(table, [], [], "training_labels").write(tmp_path)
    assert default == tmp_path / "training_set" / "training_set.parquet"
    assert labels == tmp_path / "training_set" / "training_labels" / "training_set.parquet"
    assert default.exists() and labels.exists()
    assert (tmp_path / "training_set" / "training_labels" / "manifest.json").exists()
