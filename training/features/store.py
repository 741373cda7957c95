"""Opening the Feast feature store of a run directory: SQLite by default, Redis by setting.

A run directory is a Feast repo of its own: ``gpl features apply`` writes its
``feature_store.yaml`` (registry and SQLite online store inside the run directory, or Redis when
``GPL_REDIS_URL`` is set) so that the ``feast`` CLI (``feast -c RUN_DIR ui``) and this package
open exactly the same store.
"""

from __future__ import annotations

import json
import re
import sqlite3
import struct
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
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
    removed: dict[str, int] = field(default_factory=dict)
    """Per view reloaded with ``replace``: entities taken out of the online store because its
    table no longer has a row of theirs in the load's window."""


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
        replace: Reload each view from ``start`` (default: the beginning) up to ``end``,
            replacing what is online: afterwards the view holds exactly the entities with a
            row in that window, each with its latest row there (even where the store had a
            newer one). Needed after a stage re-ran over past data, whose rows keep their
            timestamps. Entities gone from the table lose the view's values first (in Redis
            only the view's fields of their hash: other views keep theirs), counted in
            ``removed``; then every row is written over what is online, without Feast's
            Redis check that skips a row not strictly newer than the stored one. Nothing is
            emptied, so an entity that stays in the table reads its old values, then its
            new ones, never missing; readers may see some entities reloaded and others not
            yet while it runs.
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
    if replace:
        # Before the load, not after: Feast registers the load's interval as it ends, and the
        # service re-reads every item when it sees that; removing stale entities afterwards
        # would leave them in its cache until the next load.
        for name in full:
            report.removed[name] = _remove_absent_entities(
                store, store.get_feature_view(name), start or EPOCH, end
            )
        with _overwriting(store):
            store.materialize(start_date=start or EPOCH, end_date=end, feature_views=full)
    elif full:
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


@contextmanager
def _overwriting(store: FeatureStore) -> Iterator[None]:
    """Within the block, Feast writes every materialized row over what is online.

    SQLite's writer always does (an upsert). Redis's skips a row unless its event timestamp is
    strictly newer than the stored one, which keeps a rebuilt row (same timestamp, new values)
    out; its ``skip_dedup`` option writes unconditionally. It is set on this store's config
    object for the duration only, not in ``feature_store.yaml``: incremental loads and pushes
    keep the check that stops an older row from replacing a newer one. Each entity's values
    are then replaced by one HSET, so a reader sees the old row or the new one, never none
    (what emptying the view first, the previous way, could not give). The materialized rows
    hold one row per entity (the offline store's latest), so skipping the check cannot let
    an older row of an entity win over a newer one of the same load.
    """
    online = store.config.online_store
    if not _is_redis(store):
        yield
        return
    before = online.skip_dedup
    online.skip_dedup = True
    try:
        yield
    finally:
        online.skip_dedup = before


def _keys_in_window(store: FeatureStore, fv: Any, start: datetime, end: datetime) -> set[bytes]:
    """The serialized entity keys of ``fv``'s table rows in ``[start, end]``.

    Serialized as Feast's materialization serializes them (each join key's values converted to
    its entity's value type, then ``serialize_entity_key``), so they compare byte for byte with
    the keys the online store holds, whatever the join keys' types. Both ends of the window are
    inclusive, like Feast's Dask reader that the local engine materializes through
    (``pull_all_from_table_or_query``): what is kept covers everything the load writes.
    """
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.type_map import python_values_to_proto_values

    from training.features.offline_store import _read_source

    source = fv.batch_source
    types = {column.name: column.dtype.to_value_type() for column in fv.entity_columns}
    join_keys = list(types)
    # A field mapping renames source columns to join-key names; read the source's own names.
    to_source = {dst: src for src, dst in (source.field_mapping or {}).items()}
    columns = [to_source.get(key, key) for key in join_keys]
    ts_column = source.timestamp_field
    # The offline store's own read: same file, naive timestamps taken as UTC.
    table = _read_source(store.config, source, list(dict.fromkeys([*columns, ts_column])))
    ts = table.column(ts_column)
    in_window = pc.and_(
        pc.greater_equal(ts, pa.scalar(start, ts.type)),
        pc.less_equal(ts, pa.scalar(end, ts.type)),
    )
    unique = table.filter(in_window).select(columns).group_by(columns).aggregate([])
    values = [
        python_values_to_proto_values(
            unique.column(column).to_numpy(zero_copy_only=False), types[key]
        )
        for key, column in zip(join_keys, columns, strict=True)
    ]
    version = store.config.entity_key_serialization_version
    return {
        serialize_entity_key(
            EntityKeyProto(join_keys=join_keys, entity_values=list(row)),
            entity_key_serialization_version=version,
        )
        for row in zip(*values, strict=True)
    }


def _is_entity_key(blob: bytes, version: int) -> bool:
    """Whether ``blob`` is exactly one serialized entity key.

    A Redis key of another project whose name ends with this one's, its suffix cut, leaves
    that project's extra bytes after the entity key: they fail to parse, or the parse does not
    serialize back to ``blob``.
    """
    from feast.infra.key_encoding_utils import deserialize_entity_key, serialize_entity_key

    try:
        key = deserialize_entity_key(blob, entity_key_serialization_version=version)
        return serialize_entity_key(key, entity_key_serialization_version=version) == blob
    except (ValueError, struct.error):
        return False


def _remove_absent_entities(store: FeatureStore, fv: Any, start: datetime, end: datetime) -> int:
    """Remove ``fv``'s online values of entities without a row in ``[start, end]``; count them.

    Feast has no call that deletes some entities of a view (``delete_table``, ``update`` and
    ``teardown`` drop a whole view, table or database), so this reads the stores' own layout,
    with Feast's functions for its names and keys: in SQLite one table per view
    (``<project>_<view>``, rows keyed by the serialized entity key), in Redis one hash per
    entity (``serialized entity key + project``) holding every view's fields and a
    ``_ts:<view>`` field per view.
    """
    if not fv.entity_columns:  # an entityless view: one dummy key, always written
        return 0
    keep = _keys_in_window(store, fv, start, end)
    if _is_redis(store):
        return _remove_absent_redis(store, fv, keep)
    return _remove_absent_sqlite(store, fv, keep)


def _remove_absent_sqlite(store: FeatureStore, fv: Any, keep: set[bytes]) -> int:
    """Delete the rows of entities not in ``keep`` from the view's SQLite table."""
    from feast.infra.online_stores.helpers import compute_table_id

    config = store.config
    path = Path(str(config.online_store.path))
    if not path.is_absolute() and config.repo_path is not None:
        path = Path(config.repo_path) / path
    if not path.exists():
        return 0
    table = compute_table_id(
        config.project, fv, config.registry.enable_online_feature_view_versioning
    )
    quoted = '"' + table.replace('"', '""') + '"'
    # A connection of its own (Feast's is the provider's, private); the timeout rides out a
    # reader holding its lock. One transaction: a reader sees all the stale rows or none.
    with closing(sqlite3.connect(path, timeout=30)) as conn, conn:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        if not exists:  # never loaded: nothing online to remove
            return 0
        blobs = [bytes(b) for (b,) in conn.execute(f"SELECT DISTINCT entity_key FROM {quoted}")]
        # The table is this view's alone: every key not kept is a removed entity's.
        stale = [(b,) for b in blobs if b not in keep]
        conn.executemany(f"DELETE FROM {quoted} WHERE entity_key = ?", stale)
    return len(stale)


def _remove_absent_redis(store: FeatureStore, fv: Any, keep: set[bytes]) -> int:
    """HDEL the view's fields from the hashes of entities not in ``keep``.

    Only this view's fields go (an entity's hash holds every view keyed by it); Redis deletes a
    hash left empty. A key is matched by its join keys and project, and then parsed: Feast's
    own ``delete_table`` scans for ``*<project>``, which also matches the keys of a project
    whose name ends with this one's.
    """
    from feast.infra.key_encoding_utils import serialize_entity_key_prefix
    from feast.infra.online_stores.helpers import _mmh3, compute_versioned_name
    from feast.infra.online_stores.redis import RedisOnlineStore

    config = store.config
    version = config.entity_key_serialization_version
    # The client Feast's Redis store builds from the connection string (one parser for both).
    client = RedisOnlineStore()._get_client(config.online_store)
    name = compute_versioned_name(fv, config.registry.enable_online_feature_view_versioning)
    fields = [_mmh3(f"{name}:{f.name}") for f in fv.features] + [f"_ts:{name}".encode()]
    project = config.project.encode()
    prefix = serialize_entity_key_prefix(list(fv.join_keys), version)
    # The prefix holds binary lengths: escape any byte that a glob pattern would interpret.
    pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", prefix) + b"*" + project
    removed = 0
    stale: list[bytes] = []

    def flush() -> int:
        with client.pipeline(transaction=False) as pipe:
            for key in stale:
                pipe.hdel(key, *fields)
            deleted = pipe.execute()
        stale.clear()
        return sum(1 for n in deleted if n)  # only entities that had the view count

    for key in client.scan_iter(match=pattern, count=5000):
        entity = key[: -len(project)]
        # Parsed only when not kept (the few removed, and any other project's keys).
        if entity not in keep and _is_entity_key(entity, version):
            stale.append(key)
            if len(stale) >= 5000:
                removed += flush()
    return removed + (flush() if stale else 0)
