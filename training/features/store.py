"""Opening the Feast feature store of a run directory: SQLite by default, Redis by setting.

A run directory is a Feast repo of its own: ``gpl features apply`` writes its
``feature_store.yaml`` (registry and SQLite online store inside the run directory, or Redis when
``GPL_REDIS_URL`` is set) so that the ``feast`` CLI (``feast -c RUN_DIR ui``) and this package
open exactly the same store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from feast import FeatureStore, FileSource
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.io import atomic_path

FEAST_YAML = "feature_store.yaml"
OFFLINE_STORE_TYPE = "training.features.offline_store.GplOfflineStore"


class StoreSettings(BaseSettings):
    """Where the feature store lives. Read from ``GPL_*`` environment variables.

    Attributes:
        project: Feast project name; also namespaces the Redis keys.
        redis_url: ``redis://host:port/db`` to use Redis as the online store; SQLite when unset.
    """

    model_config = SettingsConfigDict(env_prefix="GPL_", extra="ignore")

    project: str = Field(default="gpl", pattern=r"^[A-Za-z0-9_]+$")
    redis_url: str | None = None

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        parsed = urlparse(value)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise ValueError(f"GPL_REDIS_URL must look like redis://host:6379/0, got {value!r}")
        return value


def redis_connection_string(url: str) -> str:
    """Convert ``redis://[:password@]host:port/db`` to Feast's ``host:port,db=N,...`` form."""
    parsed = urlparse(url)
    parts = [f"{parsed.hostname}:{parsed.port or 6379}"]
    db = parsed.path.strip("/")
    if db:
        parts.append(f"db={int(db)}")
    if parsed.password:
        parts.append(f"password={parsed.password}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def feature_store_config(run_dir: Path, settings: StoreSettings) -> dict[str, Any]:
    """The ``feature_store.yaml`` content for ``run_dir``."""
    online: dict[str, Any]
    if settings.redis_url:
        online = {
            "type": "redis",
            "connection_string": redis_connection_string(settings.redis_url),
        }
    else:
        online = {"type": "sqlite", "path": str((run_dir / "feast" / "online.db").resolve())}
    return {
        "project": settings.project,
        "provider": "local",
        "registry": {
            "registry_type": "file",
            "path": str((run_dir / "feast" / "registry.db").resolve()),
            # Serving re-reads the registry at most this often; 0 would mean never.
            "cache_ttl_seconds": 60,
        },
        "offline_store": {"type": OFFLINE_STORE_TYPE, "data_dir": str(run_dir.resolve())},
        "online_store": online,
        "entity_key_serialization_version": 3,
    }


def write_feature_store_yaml(run_dir: Path, settings: StoreSettings | None = None) -> Path:
    """Write ``run_dir/feature_store.yaml`` from ``settings`` (default: the environment)."""
    settings = settings or StoreSettings()
    (run_dir / "feast").mkdir(parents=True, exist_ok=True)
    path = run_dir / FEAST_YAML
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(feature_store_config(run_dir, settings), sort_keys=False))
    return path


def open_store(run_dir: Path, settings: StoreSettings | None = None) -> FeatureStore:
    """Open the feature store of ``run_dir``, writing its ``feature_store.yaml`` if needed.

    The yaml is rewritten whenever ``settings`` differ from it, so switching ``GPL_REDIS_URL``
    switches the online store of an existing run.
    """
    settings = settings or StoreSettings()
    wanted = feature_store_config(run_dir, settings)
    path = run_dir / FEAST_YAML
    if not path.exists() or yaml.safe_load(path.read_text()) != wanted:
        write_feature_store_yaml(run_dir, settings)
    return FeatureStore(repo_path=str(run_dir.resolve()))


@dataclass
class MaterializeReport:
    """What ``materialize`` did: the window, the views and how long it took."""

    start: datetime
    end: datetime
    views: list[str]
    seconds: float
    skipped: list[str] = field(default_factory=list)
    """Online views left out because their stage has not written its table yet."""
    outside_window: list[str] = field(default_factory=list)
    """Views materialized incrementally for the first time whose data all predates the window
    Feast then uses (``end - ttl``): nothing of them was loaded (a replayed log needs a full
    load)."""


def apply_definitions(store: FeatureStore, objects: list[Any] | None = None) -> list[str]:
    """Register the feature repo's entities, sources, views and services; return their names."""
    if objects is None:
        from feature_repo import definitions

        objects = definitions()
    store.apply(objects)
    return [getattr(obj, "name", type(obj).__name__) for obj in objects]


def materialize(
    store: FeatureStore,
    end: datetime | None = None,
    start: datetime | None = None,
    views: list[str] | None = None,
) -> MaterializeReport:
    """Load the latest feature values up to ``end`` into the online store.

    Args:
        store: The feature store.
        end: Upper bound of feature timestamps (default: now).
        start: Lower bound; default: incremental from the last materialization.
        views: Feature view names; default: every online view whose source table exists (a
            stage that has not run yet is reported in ``skipped``, not an error).
    """
    end = end or datetime.now(UTC)
    began = time.perf_counter()
    skipped: list[str] = []
    if views is None:
        from training.features.offline_store import source_path

        views = []
        for fv in store.list_feature_views():
            if not fv.online:
                continue
            source = fv.batch_source
            if isinstance(source, FileSource) and source_path(store.config, source).exists():
                views.append(fv.name)
            else:
                skipped.append(fv.name)
    if not views:
        return MaterializeReport(end, end, [], 0.0, skipped)
    outside: list[str] = []
    if start is None:
        outside = _first_loads_outside_window(store, views, end)
        store.materialize_incremental(end_date=end, feature_views=views)
        start_used = datetime.fromtimestamp(0, UTC)
    else:
        store.materialize(start_date=start, end_date=end, feature_views=views)
        start_used = start
    return MaterializeReport(start_used, end, views, time.perf_counter() - began, skipped, outside)


def _first_loads_outside_window(store: FeatureStore, views: list[str], end: datetime) -> list[str]:
    """Views never materialized whose latest row is older than ``end - ttl``.

    Feast's first incremental load of a view starts at ``end - ttl``; data older than that (a
    log replayed from the past, the demo's) is silently not loaded.
    """
    from training.features.offline_store import source_path

    out: list[str] = []
    for name in views:
        fv = store.get_feature_view(name)
        if (
            fv.materialization_intervals
            or not fv.ttl
            or not isinstance(fv.batch_source, FileSource)
        ):
            continue
        path = source_path(store.config, fv.batch_source)
        column = fv.batch_source.timestamp_field or "event_timestamp"
        latest = pc.max(pq.read_table(path, columns=[column]).column(column)).as_py()
        if latest is not None and latest < end - fv.ttl:
            out.append(name)
    return out
