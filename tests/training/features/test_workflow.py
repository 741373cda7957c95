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
