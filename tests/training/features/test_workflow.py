"""End to end: apply -> point-in-time join -> materialize -> online read, on SQLite and Redis."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

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
