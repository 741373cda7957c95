"""Opening the Feast feature store of a run directory: SQLite by default, Redis by setting.

A run directory is a Feast repo of its own: ``gpl features apply`` writes its
``feature_store.yaml`` (registry and SQLite online store inside the run directory, or Redis when
``GPL_REDIS_URL`` is set) so that the ``feast`` CLI (``feast -c RUN_DIR ui``) and this package
open exactly the same store.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
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


#: Beside the registry: which online store each view was last loaded into, and its source
#: file then. Feast's registry records when a view was materialized, not where: a run switched
#: from SQLite to Redis (``GPL_REDIS_URL``) would otherwise load only "since the last time".
MARKER_FILE = "online_loads.json"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def online_store_identity(store: FeatureStore) -> str:
    """Where ``store`` writes online values: ``redis://host:port/db`` or ``sqlite:PATH``.

    A Redis password is left out (it changes nothing about which data is there).
    """
    online = store.config.online_store
    if _is_redis(store):
        parts = str(online.connection_string).split(",")
        db = next((p.split("=", 1)[1] for p in parts[1:] if p.startswith("db=")), "0")
        return f"redis://{parts[0]}/{db}"
    return f"sqlite:{Path(str(online.path)).resolve()}"


@dataclass
class MaterializeReport:
    """What ``materialize`` did: the window, the views and how long it took."""

    start: datetime
    end: datetime
    views: list[str]
    seconds: float
    skipped: list[str] = field(default_factory=list)
    """Online views left out because their stage has not written its table yet."""
    first_loads: list[str] = field(default_factory=list)
    """Views loaded in full because this online store never had them (a new view, a new store)."""
    up_to_date: list[str] = field(default_factory=list)
    """Views already loaded up to ``end`` or later: nothing to load (an earlier ``end``)."""
    rewritten: list[str] = field(default_factory=list)
    """Views loaded incrementally whose table was rewritten since the last load without a row
    newer than it: a stage re-run over past data, which only a full load (``replace``) brings
    online."""


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
    *,
    replace: bool = False,
) -> MaterializeReport:
    """Load the latest feature values up to ``end`` into the online store.

    Incremental by default: each view from its last load into *this* online store. A view this
    store never had (new, or the run just switched stores) is loaded from the beginning, so a
    first load never depends on Feast's window (``now - ttl``, empty for a log from the past).

    Args:
        store: The feature store.
        end: Upper bound of feature timestamps (default: now).
        start: Lower bound for every view (a window load); default: incremental.
        views: Feature view names; default: every online view whose source table exists (a
            stage that has not run yet is reported in ``skipped``, not an error).
        replace: Reload each view from ``start`` (default: the beginning), replacing what is
            online. Needed after a stage re-ran over past data, whose rows keep their
            timestamps: Feast's Redis writer keeps a stored row unless the new one is strictly
            newer, so in Redis each view is emptied first and reads as missing while it
            reloads; SQLite's writer overwrites rows in place (an entity no longer in the
            table keeps its last row there).
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
    identity = online_store_identity(store)
    marker = _read_marker(_marker_path(store))
    loaded: dict[str, dict[str, Any]] = marker.setdefault("views", {})
    report = MaterializeReport(start or EPOCH, end, list(views), 0.0, skipped)
    full: list[str] = []
    incremental: list[str] = []
    # Each view's source file, read once: whether it was rewritten, and its newest row loaded.
    sources: dict[str, _Source] = {}
    for name in views:
        fv = store.get_feature_view(name)
        sources[name] = _Source.of(store, fv)
        last = loaded.get(name, {})
        if replace or start is not None:
            full.append(name)
        elif last.get("online_store") != identity or not fv.materialization_intervals:
            full.append(name)
            report.first_loads.append(name)
        elif fv.most_recent_end_time is not None and fv.most_recent_end_time >= end:
            report.up_to_date.append(name)
        else:
            incremental.append(name)
            if sources[name].rewritten_since(last.get("source"), fv.most_recent_end_time):
                report.rewritten.append(name)
    if replace and _is_redis(store):
        for name in full:  # one view at a time: each reads as missing only while it reloads
            _clear_online(store, name)
            store.materialize(start_date=start or EPOCH, end_date=end, feature_views=[name])
    elif full:  # SQLite's writer replaces rows in place: nothing to clear
        store.materialize(start_date=start or EPOCH, end_date=end, feature_views=full)
    if incremental:
        store.materialize_incremental(end_date=end, feature_views=incremental)
    for name in [*full, *incremental]:
        loaded[name] = {
            "online_store": identity,
            "source": sources[name].stamp,
            "loaded_until": end.isoformat(),
            "newest_row": sources[name].newest(end),
        }
    with atomic_path(_marker_path(store)) as tmp:
        tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    report.views = [*full, *incremental]
    report.seconds = time.perf_counter() - began
    return report


def _marker_path(store: FeatureStore) -> Path:
    return Path(store.config.registry.path).parent / MARKER_FILE


def _read_marker(path: Path) -> dict[str, Any]:
    """The loads marker (empty when absent or unreadable: every view then loads in full)."""
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def read_online_loads(store: FeatureStore) -> dict[str, dict[str, Any]]:
    """Per view, what the last ``materialize`` loaded (views never loaded are absent).

    Each entry: ``online_store`` (where), ``loaded_until`` (the load's end, ISO),
    ``newest_row`` (the latest feature timestamp at or before it, ISO; None for an empty table).
    """
    views = _read_marker(_marker_path(store)).get("views", {})
    return views if isinstance(views, dict) else {}


@dataclass
class _Source:
    """A view's source file as ``materialize`` found it (both None: no file source)."""

    stamp: list[int] | None
    """(mtime in ns, size) of the file: changes when a stage rewrites it."""
    timestamps: pa.ChunkedArray | None
    """Its feature timestamp column."""

    @classmethod
    def of(cls, store: FeatureStore, fv: Any) -> _Source:
        from training.features.offline_store import source_path

        source = fv.batch_source
        if not isinstance(source, FileSource):
            return cls(None, None)
        path = source_path(store.config, source)
        try:
            st = path.stat()
        except OSError:
            return cls(None, None)
        column = source.timestamp_field or "event_timestamp"
        return cls([st.st_mtime_ns, st.st_size], pq.read_table(path, columns=[column])[column])

    def rewritten_since(self, last_stamp: Any, loaded_until: datetime | None) -> bool:
        """Changed since the load that stamped ``last_stamp``, yet no row newer than it."""
        if self.timestamps is None or last_stamp in (None, self.stamp) or loaded_until is None:
            return False
        latest = pc.max(self.timestamps).as_py()
        return latest is not None and latest <= loaded_until

    def newest(self, end: datetime) -> str | None:
        """The latest feature timestamp at or before ``end`` (ISO), or None."""
        if self.timestamps is None:
            return None
        ts = self.timestamps
        bound = pa.scalar(end, pa.timestamp("us", "UTC")).cast(ts.type)
        newest = pc.max(ts.filter(pc.less_equal(ts, bound))).as_py()
        return newest.isoformat() if newest is not None else None


def _is_redis(store: FeatureStore) -> bool:
    return bool(getattr(store.config.online_store, "type", "") == "redis")


def _clear_online(store: FeatureStore, name: str) -> None:
    """Delete a view's online values in Redis."""
    from feast.infra.online_stores.redis import RedisOnlineStore

    RedisOnlineStore().delete_table(store.config, store.get_feature_view(name))
