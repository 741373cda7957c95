"""item_semantics in Feast: materialized to SQLite and Redis, joined with list defaults."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from feast import FeatureService

from tests.factories import T0
from tests.training.sids.helpers import make_catalog, tiny_config
from training.features.store import StoreSettings, apply_definitions, materialize, open_store
from training.features.training_set import build_training_set
from training.sids.job import STAGE_DIR, train_sids

FEATURES = ["item_semantics:sid", "item_semantics:sid_codes", "item_semantics:content_embedding"]


@pytest.fixture(params=["sqlite", "redis"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    project = f"sids_{request.param}_{abs(hash(tmp_path)) % 10**8}"
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        return StoreSettings(project=project, redis_url=server.url)
    return StoreSettings(project=project)


def test_materialize_and_read_online(
    settings: StoreSettings, tiny_bert: Path, tmp_path: Path
) -> None:
    result = train_sids(make_catalog(60), tiny_config(tiny_bert), tmp_path / STAGE_DIR)
    store = open_store(tmp_path, settings)
    apply_definitions(store)
    report = materialize(store, end=T0 + timedelta(days=30), start=T0 - timedelta(days=1))
    assert "item_semantics" in report.views

    expected = result.table.to_pandas().set_index("item_id")
    ids = ["i0000", "i0017", "i0059"]
    online = store.get_online_features(
        features=FEATURES, entity_rows=[{"item_id": i} for i in [*ids, "unknown"]]
    ).to_dict()
    for k, item_id in enumerate(ids):
        assert online["sid"][k] == expected.loc[item_id, "sid"]
        assert list(online["sid_codes"][k]) == list(expected.loc[item_id, "sid_codes"])
        np.testing.assert_allclose(
            online["content_embedding"][k], expected.loc[item_id, "content_embedding"], rtol=1e-6
        )
    assert online["sid"][3] is None


def test_point_in_time_join_fills_list_defaults(tiny_bert: Path, tmp_path: Path) -> None:
    catalog = make_catalog(40)
    train_sids(catalog, tiny_config(tiny_bert), tmp_path / STAGE_DIR)
    store = open_store(tmp_path, StoreSettings(project="sids_join"))
    apply_definitions(store)
    from feature_repo.feature_views import item_semantics

    store.apply([FeatureService(name="with_sids", features=[item_semantics])])
    entity = pa.table(
        {
            "request_id": ["r0", "r1", "r2"],
            # i0005 becomes valid at T0 + 5h: the first row is before it, so it is missing.
            "item_id": ["i0005", "i0005", "nope"],
            "event_timestamp": pa.array(
                [T0 + timedelta(hours=1), T0 + timedelta(days=3), T0 + timedelta(days=3)],
                pa.timestamp("us", tz="UTC"),
            ),
        }
    )
    out = build_training_set(store, entity, "with_sids").table.to_pylist()
    assert [r["item_semantics__missing"] for r in out] == [1, 0, 1]
    assert out[0]["item_semantics__sid"] == "" and out[0]["item_semantics__sid_codes"] == []
    assert out[2]["item_semantics__content_embedding"] == []
    assert len(out[1]["item_semantics__sid_codes"]) == 4
    assert out[1]["item_semantics__sid"].startswith("<a_")
