"""End to end: apply -> point-in-time join -> materialize -> online read, on SQLite and Redis."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from feast import FeatureStore

from tests.factories import T0, make_items, make_requests, write_empty_anchors
from training.features.stats import StatsConfig, compute_feature_tables
from training.features.store import StoreSettings, apply_definitions, materialize, open_store
from training.features.training_set import build_training_set


@pytest.fixture(params=["sqlite", "redis"])
def settings(request, tmp_path: Path) -> StoreSettings:  # type: ignore[no-untyped-def]
    project = f"wf_{request.param}_{abs(hash(tmp_path)) % 10**8}"
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        return StoreSettings(project=project, redis_url=server.url)
    return StoreSettings(project=project)


def test_apply_join_materialize_online(settings: StoreSettings, tmp_path: Path) -> None:
    items = make_items(30)
    requests = make_requests(n_requests=80, n_users=8, n_items=30, seed=11)
    tables = compute_feature_tables(items, requests)
    tables.write(tmp_path, StatsConfig())
    write_empty_anchors(tmp_path)

    store = open_store(tmp_path, settings)
    config = yaml.safe_load((tmp_path / "feature_store.yaml").read_text())
    assert config["online_store"]["type"] == ("redis" if settings.redis_url else "sqlite")
    names = apply_definitions(store)
    assert {"user_activity", "item_popularity", "item_content", "preranker"} <= set(names)
    assert {fv.name for fv in store.list_feature_views()} == {
        "user_activity",
        "user_history",
        "item_popularity",
        "item_content",
        "user_interest_anchors",
        "user_interest_anchor_embeddings",
        "pseudo_labels",
        "item_semantics",
    }

    training = build_training_set(store, requests)
    assert training.table.num_rows == requests.num_rows

    end = T0 + timedelta(days=40)
    report = materialize(store, end=end, start=T0 - timedelta(days=1))
    assert set(report.views) == {
        "user_activity",
        "user_history",
        "item_popularity",
        "item_content",
        "user_interest_anchors",
    }
    # Stages that have not run are skipped, not failed; offline-only views are never loaded.
    assert sorted(report.skipped) == ["item_semantics"]

    # Online values are the latest snapshot of each entity.
    users = sorted(set(requests.column("user_id").to_pylist()))
    items_seen = sorted(set(requests.column("item_id").to_pylist()))
    rows = [{"user_id": u, "item_id": i} for u, i in zip(users, items_seen, strict=False)]
    online = store.get_online_features(
        features=store.get_feature_service("preranker"), entity_rows=rows, full_feature_names=True
    ).to_dict()
    ua = tables.user_activity.to_pandas().sort_values("event_timestamp").groupby("user_id").last()
    ip = tables.item_popularity.to_pandas().sort_values("event_timestamp").groupby("item_id").last()
    for k, row in enumerate(rows):
        assert online["user_activity__clicks"][k] == ua.loc[row["user_id"], "clicks"]
        assert online["item_popularity__impressions"][k] == ip.loc[row["item_id"], "impressions"]
    # An unknown entity reads as missing (None), which serving turns into the declared default.
    unknown = store.get_online_features(
        features=["user_activity:clicks"], entity_rows=[{"user_id": "nobody"}]
    ).to_dict()
    assert unknown["clicks"] == [None]


def test_anchor_vectors_stay_offline(settings: StoreSettings, tmp_path: Path) -> None:
    """The anchors' vectors are an offline-only view of the same file: joinable point in time,
    never materialized (serving reads item_semantics), while the anchors' ids are online."""
    import pandas as pd
    import pyarrow as pa

    from training.anchors.schema import ANCHORS_DIR, ANCHORS_FILE, ANCHORS_SCHEMA
    from training.io import write_table

    row = {
        "user_id": "u0",
        "event_timestamp": T0,
        "anchor_sids": ["<a_1><b_2><c_0>"],
        "anchor_item_ids": ["i1"],
        "anchor_embeddings": [0.5, 0.25],
        "anchor_log_probs": [-1.0],
        "num_anchors": 1,
        "history_length": 3,
        "history_hash": 7,
    }
    write_table(pa.Table.from_pylist([row], ANCHORS_SCHEMA), tmp_path / ANCHORS_DIR / ANCHORS_FILE)
    store = open_store(tmp_path, settings)
    apply_definitions(store)
    views = {fv.name: fv for fv in store.list_feature_views()}
    assert not views["user_interest_anchor_embeddings"].online
    assert "anchor_embeddings" not in {f.name for f in views["user_interest_anchors"].features}
    report = materialize(store, end=T0 + timedelta(days=1), start=T0 - timedelta(days=1))
    assert "user_interest_anchors" in report.views
    assert "user_interest_anchor_embeddings" not in report.views + report.skipped
    online = store.get_online_features(
        features=["user_interest_anchors:anchor_item_ids"], entity_rows=[{"user_id": "u0"}]
    ).to_dict()
    assert online["anchor_item_ids"] == [["i1"]]
    try:  # SQLite has no table for a view never materialized; Redis has no value
        vectors = store.get_online_features(
            features=["user_interest_anchor_embeddings:anchor_embeddings"],
            entity_rows=[{"user_id": "u0"}],
        ).to_dict()["anchor_embeddings"]
    except Exception:  # which error depends on the online store
        vectors = [None]
    assert vectors == [None]
    entities = pd.DataFrame(
        {
            "user_id": ["u0", "u0"],
            "event_timestamp": [T0 - timedelta(hours=1), T0 + timedelta(hours=1)],
        }
    )
    joined = store.get_historical_features(
        entity_df=entities, features=["user_interest_anchor_embeddings:anchor_embeddings"]
    ).to_df()
    got = joined.sort_values("event_timestamp")["anchor_embeddings"].tolist()
    assert got[0] is None and list(got[1]) == [0.5, 0.25]


def _online_impressions(store: FeatureStore, items: list[str]) -> list[Any]:
    got = store.get_online_features(
        features=["item_popularity:impressions"], entity_rows=[{"item_id": i} for i in items]
    ).to_dict()
    return list(got["impressions"])


def _latest_impressions(path: Path, items: list[str]) -> list[Any]:
    frame = pq.read_table(path).to_pandas().sort_values("event_timestamp")
    latest = frame.groupby("item_id").last()
    return [int(latest.loc[i, "impressions"]) for i in items]


def test_incremental_first_load_full_reload_and_rewritten_tables(
    settings: StoreSettings, tmp_path: Path
) -> None:
    """A first incremental load of data from the past loads all of it (Feast's own first window,
    now - ttl, loaded none); a table rebuilt with the same timestamps is flagged by an incremental
    load and brought online by a full one (Redis kept the old values: its writer skips rows not
    strictly newer); an earlier end loads nothing and registers no backwards interval."""
    items = make_items(30)
    requests = make_requests(n_requests=80, n_users=8, n_items=30, seed=11)
    compute_feature_tables(items, requests).write(tmp_path, StatsConfig())
    write_empty_anchors(tmp_path)
    store = open_store(tmp_path, settings)
    apply_definitions(store)
    seen = sorted(set(requests.column("item_id").to_pylist()))[:6]
    path = tmp_path / "features" / "item_popularity.parquet"

    first = materialize(store, end=T0 + timedelta(days=40))
    assert set(first.first_loads) == set(first.views) and "item_popularity" in first.views
    assert _online_impressions(store, seen) == _latest_impressions(path, seen)

    table = pq.read_table(path)
    index = table.schema.get_field_index("impressions")
    bumped = pc.add(table.column("impressions"), 1000).cast(table.schema.field(index).type)
    pq.write_table(table.set_column(index, table.schema.field(index), bumped), path)
    again = materialize(store, end=T0 + timedelta(days=41))
    assert again.first_loads == [] and again.rewritten == ["item_popularity"]
    full = materialize(store, end=T0 + timedelta(days=41), replace=True)
    assert full.rewritten == [] and "item_popularity" in full.views
    assert _online_impressions(store, seen) == _latest_impressions(path, seen)

    earlier = materialize(store, end=T0 + timedelta(days=20))
    assert earlier.views == [] and "item_popularity" in earlier.up_to_date
    fv = store.get_feature_view("item_popularity")
    assert fv.most_recent_end_time is not None
    assert fv.most_recent_end_time >= T0 + timedelta(days=41)


def test_switching_the_online_store_loads_the_new_one_in_full(
    redis_server: Any, tmp_path: Path
) -> None:
    """The registry records when views were loaded, not where: a run materialized into SQLite
    and then pointed at Redis loaded nothing into Redis ("since the last load")."""
    items = make_items(30)
    requests = make_requests(n_requests=80, n_users=8, n_items=30, seed=11)
    compute_feature_tables(items, requests).write(tmp_path, StatsConfig())
    write_empty_anchors(tmp_path)
    project = f"switch_{abs(hash(tmp_path)) % 10**8}"
    sqlite = open_store(tmp_path, StoreSettings(project=project))
    apply_definitions(sqlite)
    assert materialize(sqlite, end=T0 + timedelta(days=40)).first_loads
    redis = open_store(tmp_path, StoreSettings(project=project, redis_url=redis_server.url))
    switched = materialize(redis, end=T0 + timedelta(days=41))
    assert set(switched.first_loads) == set(switched.views) and switched.views
    seen = sorted(set(requests.column("item_id").to_pylist()))[:6]
    path = tmp_path / "features" / "item_popularity.parquet"
    assert _online_impressions(redis, seen) == _latest_impressions(path, seen)
    # And back: SQLite last had the views at day 40, but a load into Redis came in between.
    sqlite = open_store(tmp_path, StoreSettings(project=project))
    back = materialize(sqlite, end=T0 + timedelta(days=42))
    assert set(back.first_loads) == set(back.views)
