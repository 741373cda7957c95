"""A served run: small features, a trained and exported bundle, a materialized online store."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from feast import FeatureStore

from export.bundle import export_bundle
from gpl_service.app import create_app
from gpl_service.settings import ServeSettings
from tests.conftest import RedisServer
from tests.factories import T0
from tests.training.preranker.conftest import USERS, small_config, write_run_inputs
from training.features.store import StoreSettings, apply_definitions, materialize, open_store
from training.io import write_table
from training.preranker.job import (
    fit,
    join_features,
    prepare,
    save_preranker,
    split_at,
    time_quantile,
)
from training.sids.job import ITEM_SEMANTICS_SCHEMA

ADMIN_TOKEN = "test-admin-token-0123456789"
PROJECT = "serve_test"


@dataclass
class Served:
    """A run directory the service can serve, and what tests compare against."""

    root: Path
    bundle: Path
    store: FeatureStore
    requests: pa.Table
    semantics: pa.Table
    as_of: datetime
    users: list[str]
    items: list[str]


def semantics_table(semantics: pa.Table) -> pa.Table:
    """The test catalog's vectors in the SID stage's full ``item_semantics`` schema."""
    n = semantics.num_rows
    columns = {
        "item_id": semantics.column("item_id"),
        "event_timestamp": pa.array([T0 - timedelta(days=1)] * n, pa.timestamp("us", tz="UTC")),
        "sid_codes": pa.array([[k % 4, k % 7, 0] for k in range(n)], pa.list_(pa.int32())),
        "sid": [f"<a_{k % 4}><b_{k % 7}><c_0>" for k in range(n)],
        "content_embedding": semantics.column("content_embedding"),
    }
    return pa.Table.from_pydict(columns, schema=ITEM_SEMANTICS_SCHEMA)


def materialize_all(store: FeatureStore, as_of: datetime) -> None:
    """Load every online view's rows up to ``as_of`` into the online store."""
    report = materialize(store, end=as_of, start=as_of - timedelta(days=3650))
    assert report.views, "nothing materialized"


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """Features, anchors, pseudo-labels, a gpl_hap pre-ranker, its bundle, SQLite online store."""
    root = tmp_path_factory.mktemp("served_run")
    _, requests, semantics = write_run_inputs(root)
    write_table(requests, root / "funnel" / "requests.parquet")
    write_table(semantics_table(semantics), root / "sids" / "item_semantics.parquet")
    store = open_store(root, StoreSettings(project=PROJECT))
    apply_definitions(store)
    cutoff = time_quantile(requests, 0.8)
    early = split_at(join_features(store, requests), cutoff).before
    cfg = small_config()
    prepared = prepare(early, semantics, cfg)
    model_dir = save_preranker(
        fit(prepared, cfg, "gpl_hap"),
        prepared,
        cfg,
        root / "preranker",
        inputs={"requests_before": str(cutoff), "rows": early.num_rows},
    )
    bundle = export_bundle(model_dir, root / "bundle", run_dir=root).path
    last: datetime = pc.max(requests.column("event_timestamp")).as_py()
    as_of = last + timedelta(days=1)
    materialize_all(store, as_of)
    return Served(
        root=root,
        bundle=bundle,
        store=store,
        requests=requests,
        semantics=semantics,
        as_of=as_of.astimezone(UTC),
        users=list(USERS),
        items=semantics.column("item_id").to_pylist(),
    )


def settings_for(served: Served, **overrides: Any) -> ServeSettings:
    """Service settings for the served run (fast watcher and store retry for tests)."""
    values: dict[str, Any] = {
        "run_dir": served.root,
        "bundle_dir": served.bundle,
        "as_of": served.as_of,
        "admin_token": ADMIN_TOKEN,
        "max_candidates": 100,
        "default_top_k": 10,
        "registry_check_seconds": 0.2,
        "store_retry_seconds": 0.2,
        "providers": "cpu",
    }
    values.update(overrides)
    return ServeSettings(**values)


@pytest.fixture
def app(served: Served) -> FastAPI:
    """The app over the served run's SQLite store."""
    return create_app(settings_for(served), store=served.store)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A client with the lifespan run (store opened, cache filled, bundle loaded)."""
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@dataclass
class RedisServed:
    """The served run copied onto a private Redis server that tests may stop and restart."""

    served: Served
    root: Path
    store: FeatureStore
    redis: RedisServer


@pytest.fixture
def redis_served(served: Served, tmp_path: Path) -> Iterator[RedisServed]:
    """A private redis-server with the run materialized into it."""
    server = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    server.start()
    root = tmp_path / "run"
    shutil.copytree(served.root, root, ignore=shutil.ignore_patterns("feast", "feature_store.yaml"))
    shutil.rmtree(root / "bundle")
    store = open_store(root, StoreSettings(project=PROJECT, redis_url=server.url))
    apply_definitions(store)
    materialize_all(store, served.as_of)
    try:
        yield RedisServed(served, root, store, server)
    finally:
        server.stop()


@pytest.fixture
def rs_client(redis_served: RedisServed) -> Iterator[tuple[RedisServed, TestClient]]:
    """The app over the private Redis copy, lifespan run."""
    settings = settings_for(redis_served.served, run_dir=redis_served.root)
    app = create_app(settings, store=redis_served.store)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield redis_served, client


@pytest.fixture
def served_redis_down(redis_served: RedisServed) -> RedisServed:
    """The Redis copy with its server stopped (tests start it again)."""
    redis_served.redis.stop()
    return redis_served
