"""The row-preserving, leak-free point-in-time join, through Feast's public API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Int64

from training.features.store import OFFLINE_STORE_TYPE

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DIM = 8


def _store(
    root: Path, offline_type: str, ttl: timedelta = timedelta(0)
) -> tuple[FeatureStore, list]:
    """A store over one item view with an embedding and a counter, on ``offline_type``."""
    root.mkdir(parents=True, exist_ok=True)
    offline: dict = {"type": offline_type}
    (root / "feature_store.yaml").write_text(
        yaml.safe_dump(
            {
                "project": "pit",
                "provider": "local",
                "registry": str(root / "registry.db"),
                "offline_store": offline,
                "online_store": {"type": "sqlite", "path": str(root / "online.db")},
                "entity_key_serialization_version": 3,
            }
        )
    )
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)
    source = FileSource(
        name="emb",
        path=str(root / "emb.parquet"),
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
    )
    view = FeatureView(
        name="emb",
        entities=[item],
        ttl=ttl,
        schema=[
            Field(name="item_id", dtype=pa_string()),
            Field(name="embedding", dtype=Array(Float32)),
            Field(name="version", dtype=Int64),
        ],
        source=source,
    )
    return FeatureStore(repo_path=str(root)), [item, source, view]


def pa_string():  # type: ignore[no-untyped-def]
    from feast.types import String

    return String


def _write_features(path: Path) -> None:
    """Item i0 has versions at day 1, 5 (twice: created later wins) and 10; i1 at day 3 only."""
    rows = [
        ("i0", T0 + timedelta(days=1), T0 + timedelta(days=1), 1),
        ("i0", T0 + timedelta(days=5), T0 + timedelta(days=5), 2),
        ("i0", T0 + timedelta(days=5), T0 + timedelta(days=6), 3),
        ("i0", T0 + timedelta(days=10), T0 + timedelta(days=10), 4),
        ("i1", T0 + timedelta(days=3), T0 + timedelta(days=3), 5),
    ]
    table = pa.table(
        {
            "item_id": [r[0] for r in rows],
            "event_timestamp": pa.array([r[1] for r in rows], pa.timestamp("us", tz="UTC")),
            "created": pa.array([r[2] for r in rows], pa.timestamp("us", tz="UTC")),
            "embedding": pa.array(
                [np.full(DIM, r[3], np.float32) for r in rows], pa.list_(pa.float32())
            ),
            "version": pa.array([r[3] for r in rows], pa.int64()),
        }
    )
    pq.write_table(table, path)


ENTITY = pd.DataFrame(
    {
        "item_id": ["i0", "i0", "i0", "i0", "i1", "i2", "i1", "i0"],
        "event_timestamp": pd.to_datetime(
            [
                T0,  # before any feature row of i0: no match
                T0 + timedelta(days=2),  # version 1
                T0 + timedelta(days=5),  # equal timestamp: the later-created version 3
                T0 + timedelta(days=9, hours=23),  # still version 3: day 10 is in its future
                T0 + timedelta(days=4),  # version 5
                T0 + timedelta(days=4),  # unknown item: no match
                T0 + timedelta(days=2),  # before i1's only row: no match
                T0 + timedelta(days=11),  # version 4
            ],
            utc=True,
        ),
        "request_id": [f"r{i}" for i in range(8)],
    }
)
EXPECTED_VERSION = [None, 1, 3, 3, 5, None, None, 4]


def _join(store: FeatureStore) -> pd.DataFrame:
    return store.get_historical_features(
        entity_df=ENTITY.copy(), features=["emb:embedding", "emb:version"]
    ).to_df()


@pytest.fixture
def gpl_store(tmp_path: Path) -> FeatureStore:
    store, objects = _store(tmp_path / "gpl", OFFLINE_STORE_TYPE)
    _write_features(tmp_path / "gpl" / "emb.parquet")
    store.apply(objects)
    return store


def test_every_row_kept_in_order_with_point_in_time_values(gpl_store: FeatureStore) -> None:
    out = _join(gpl_store)
    assert len(out) == len(ENTITY)
    assert out["request_id"].tolist() == ENTITY["request_id"].tolist()
    versions = [None if pd.isna(v) else int(v) for v in out["version"]]
    assert versions == EXPECTED_VERSION
    for emb, version in zip(out["embedding"], EXPECTED_VERSION, strict=True):
        if version is None:
            assert emb is None
        else:
            np.testing.assert_array_equal(np.asarray(emb), np.full(DIM, version, np.float32))


def test_no_future_feature_row_is_ever_joined(gpl_store: FeatureStore, tmp_path: Path) -> None:
    features = pq.read_table(tmp_path / "gpl" / "emb.parquet").to_pandas()
    out = _join(gpl_store)
    for (_, row), version in zip(out.iterrows(), out["version"], strict=True):
        if pd.isna(version):
            continue
        stamped = features.loc[features["version"] == version, "event_timestamp"].iloc[0]
        assert stamped <= row["event_timestamp"]


def test_ttl_expires_old_rows(tmp_path: Path) -> None:
    store, objects = _store(tmp_path / "ttl", OFFLINE_STORE_TYPE, ttl=timedelta(days=2))
    _write_features(tmp_path / "ttl" / "emb.parquet")
    store.apply(objects)
    out = _join(store)
    # day 9h23 -> version 3 stamped day 5: older than 2 days, so unmatched; day 11 -> day 10 ok.
    versions = [None if pd.isna(v) else int(v) for v in out["version"]]
    assert versions == [None, 1, 3, None, 5, None, None, 4]


def test_feast_file_store_drops_rows_that_ours_keeps(
    tmp_path: Path, gpl_store: FeatureStore
) -> None:
    """The pitfall this store exists for: Feast's file store loses unmatched entity rows."""
    store, objects = _store(tmp_path / "file", "file")
    _write_features(tmp_path / "file" / "emb.parquet")
    store.apply(objects)
    theirs = _join(store)
    ours = _join(gpl_store)
    assert len(ours) == len(ENTITY)
    matched = sum(v is not None for v in EXPECTED_VERSION)
    assert len(theirs) < len(ENTITY), "Feast's file store no longer drops rows: revisit the docs"
    assert len(theirs) >= matched
    # Where both return a row, they agree on the value.
    merged = theirs.merge(ours, on="request_id", suffixes=("_file", "_gpl"))
    assert (merged["version_file"].astype("Int64") == merged["version_gpl"].astype("Int64")).all()


def test_materialize_loads_latest_row_per_key(gpl_store: FeatureStore) -> None:
    gpl_store.materialize(start_date=T0 - timedelta(days=1), end_date=T0 + timedelta(days=7))
    got = gpl_store.get_online_features(
        features=["emb:version", "emb:embedding"],
        entity_rows=[{"item_id": "i0"}, {"item_id": "i1"}],
    ).to_dict()
    # Within the window i0's latest is the day-5 row created last (version 3); day 10 is outside.
    assert got["version"] == [3, 5]
    assert got["embedding"][0] == [3.0] * DIM


def test_opening_the_store_does_not_load_duckdb() -> None:
    """Feast imports the offline store whenever a store is opened, the service's included; the
    service never joins offline, and DuckDB's binding loaded there printed ~45 lines of
    nanobind leak reports at every `gpl serve` exit."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import training.features.offline_store, training.features.store, gpl_service.app\n"
        "assert 'duckdb' not in sys.modules, 'duckdb imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
